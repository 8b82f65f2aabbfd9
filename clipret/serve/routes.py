"""The HTTP endpoints, over an :class:`~clipret.serve.app.AppState`.

Request bodies are read here and turned into queries by :mod:`clipret.serve.inputs` in a worker
thread (image decoding never blocks the event loop); the queries then wait in the micro-batcher.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from clipret.errors import first_line
from clipret.serve.inputs import query_from_json, query_from_upload
from clipret.serve.page import PAGE
from clipret.serve.query import Query, RequestError
from clipret.serve.schemas import BatchResponse, Problem, SearchResponse, batch_body, search_body

__all__ = ["add_routes"]

_REFUSALS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text}
    for code, text in {400: "Unreadable image or malformed request", 401: "Missing or wrong token",
                       404: "Unknown gallery id", 413: "Body over --max-upload", 422: "Bad vector or option",
                       503: "Still loading"}.items()
}


def _content_type(request: Any) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json(request: Any) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an int too long, nesting too deep
        raise RequestError(400, "bad_request", f"the body is not valid JSON ({first_line(exc)})") from None


async def _form_uploads(request: Any, max_files: int) -> tuple[list[bytes], dict[str, Any]]:
    """The bytes of every ``image`` file of a multipart body, and its other (option) fields."""
    form = await request.form(max_files=max_files, max_fields=16)
    try:
        files = [await part.read() for part in form.getlist("image") if not isinstance(part, str)]
        fields = {key: value for key, value in form.multi_items() if key != "image"}
        if any(not isinstance(value, str) for value in fields.values()):
            raise RequestError(400, "bad_request", "only the 'image' field may be a file")
        if not files:
            raise RequestError(400, "bad_request", "send the image as a multipart file field named 'image'")
        return files, fields
    finally:
        await form.close()


def _unsupported(request: Any) -> RequestError:
    return RequestError(415, "bad_request", f"send multipart/form-data with an 'image' file, or JSON "
                        f"(got Content-Type {_content_type(request) or 'none'!r})")


def add_routes(api: Any, state: Any) -> None:
    """Register the endpoints on the FastAPI ``api``."""
    settings, metrics = state.settings, state.metrics

    async def answer(queries: list[Query]) -> list[dict[str, Any]]:
        answers = await state.batcher.submit(queries)
        for q in queries:
            metrics.queries.labels(kind=q.kind).inc()
        return [a.to_dict() for a in answers]

    @api.post("/search", response_model=SearchResponse, responses=_REFUSALS, openapi_extra=search_body())
    async def search(request: Request) -> JSONResponse:
        """One query: a multipart upload (field ``image``, options as fields) or JSON with exactly one of
        ``image`` (base64), ``vector``, ``id`` or ``text``; options ``k``, ``qe``, ``rerank``, ``tta``."""
        start, service = time.perf_counter(), state.ready()
        kind = _content_type(request)
        if kind == "multipart/form-data":
            files, fields = await _form_uploads(request, max_files=1)
            query = await run_in_threadpool(query_from_upload, files[0], fields, settings, service, service.decode_side)
        elif kind == "application/json":
            query = await run_in_threadpool(query_from_json, await _json(request), settings, service, service.decode_side)
        else:
            raise _unsupported(request)
        [result] = await answer([query])
        return JSONResponse({**result, "took_ms": (time.perf_counter() - start) * 1000})

    @api.post("/search/batch", response_model=BatchResponse, responses=_REFUSALS, openapi_extra=batch_body())
    async def search_batch(request: Request) -> JSONResponse:
        """Several queries in one call: JSON ``{"queries": [...]}`` (each as /search takes it), or a
        multipart body with several ``image`` files sharing the option fields."""
        start, service = time.perf_counter(), state.ready()
        kind, most = _content_type(request), settings.max_queries
        if kind == "multipart/form-data":
            files, fields = await _form_uploads(request, max_files=most)
            jobs = [run_in_threadpool(query_from_upload, data, fields, settings, service, service.decode_side) for data in files]
        elif kind == "application/json":
            body = await _json(request)
            items = body.get("queries") if isinstance(body, dict) and set(body) == {"queries"} else None
            if not isinstance(items, list) or not items:
                raise RequestError(400, "bad_request", 'a batch is {"queries": [query, ...]} with at least one query')
            if len(items) > most:
                raise RequestError(422, "bad_option", f"a batch holds at most {most} queries, got {len(items)}")
            jobs = [run_in_threadpool(query_from_json, item, settings, service, service.decode_side) for item in items]
        else:
            raise _unsupported(request)
        queries = await asyncio.gather(*jobs)
        results = await answer(list(queries))
        return JSONResponse({"results": results, "took_ms": (time.perf_counter() - start) * 1000})

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"model": Problem, "description": "Still loading, or loading failed"}})
    async def readyz() -> dict[str, Any]:
        """Readiness: the model and the gallery are loaded (503 until then)."""
        service = state.ready()
        return {"ready": True, "gallery": len(service.gallery), "dim": service.dim, "text": service.text is not None,
                "text_gallery": len(service.text_gallery) if service.text_gallery is not None else 0,
                "max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms}

    @api.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format: requests, errors by kind, latency and batch-size histograms."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @api.get("/items/{item_id:path}/thumbnail", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": Problem, "description": "Not a gallery item"}})
    async def thumbnail(item_id: str) -> Response:
        """A JPEG thumbnail of a gallery item: only ids in the gallery's manifest, only from under its root."""
        from clipret.serve.thumbs import thumbnail_jpeg

        service = state.ready()
        path = await run_in_threadpool(service.item_file, item_id)
        data = await run_in_threadpool(thumbnail_jpeg, path, settings.thumb_size) if path is not None else None
        if data is None:
            raise RequestError(404, "not_found", "no thumbnail for that id: it is not a readable item of this gallery")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)
