"""The FastAPI app: :func:`create_app` wires the service, the micro-batcher, the guards and the routes.

Endpoints: ``POST /search`` and ``POST /search/batch`` (:mod:`clipret.serve.routes`), ``GET
/healthz`` (alive), ``GET /readyz`` (model and gallery loaded), ``GET /metrics`` (Prometheus),
``GET /items/{id}/thumbnail``, ``GET /`` (the web page) and FastAPI's ``/docs``.

Every refusal is JSON ``{"kind", "detail"}`` with its status (:class:`~clipret.serve.query.RequestError`);
an unexpected failure is a 500 with no internals in it, counted as ``internal``, and the server
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from clipret.serve.batcher import MicroBatcher
from clipret.serve.guards import Guard, error_body
from clipret.serve.metrics import ServeMetrics
from clipret.serve.query import RequestError
from clipret.serve.service import SearchService
from clipret.serve.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["AppState", "create_app"]

log = logging.getLogger("clipret.serve")


class AppState:
    """What the routes share: the settings, the metrics, and (once loaded) the service and its batcher."""

    def __init__(self, settings: Settings, metrics: ServeMetrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.service: SearchService | None = None
        self.batcher: MicroBatcher | None = None
        self.problem: str | None = None  # why loading failed

    def ready(self) -> SearchService:
        """The service, or a 503 while it loads (or after it failed to)."""
        if self.service is None or self.batcher is None:
            raise RequestError(503, "not_ready", self.problem or "the model and gallery are still loading; retry shortly")
        return self.service

    async def start(self, service: SearchService) -> None:
        batcher = MicroBatcher(service.run, max_batch=self.settings.max_batch, max_wait_ms=self.settings.max_wait_ms,
                               on_batch=self.metrics.batch_size.observe)
        await batcher.start()
        self.service, self.batcher = service, batcher

    async def load(self, loader: Callable[[], SearchService]) -> None:
        """Load the service in a thread (the event loop keeps answering /healthz and /readyz), then start."""
        try:
            service = await asyncio.to_thread(loader)
        except Exception as exc:  # reported by /readyz; the process stays up so the reason can be read
            self.problem = f"loading failed: {exc}"
            log.error("clipret serve: %s", self.problem)
            return
        await self.start(service)


def create_app(settings: Settings, service: SearchService | Callable[[], SearchService] | None = None) -> FastAPI:
    """The FastAPI app for ``settings``.

    ``service``: an already loaded :class:`SearchService` (ready at once), a function that loads
    one (called in a thread at startup; ``/readyz`` answers 503 until it returns), or None to load
    ``SearchService.load(settings)`` that way. Requests pass the token, body-limit and metrics
    guard (:class:`~clipret.serve.guards.Guard`) first; ``app.state.clipret`` is the :class:`AppState`.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from clipret import __version__
    from clipret.serve import routes

    settings.check()
    metrics = ServeMetrics()
    state = AppState(settings, metrics)
    if service is None:
        loader: Callable[[], SearchService] | None = lambda: SearchService.load(settings)  # noqa: E731
    else:
        loader = None if isinstance(service, SearchService) else service

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load(loader)) if loader is not None else None
        if loader is None:
            await state.start(service)  # type: ignore[arg-type]
        yield
        if loading is not None and not loading.done():
            loading.cancel()
        if state.batcher is not None:
            await state.batcher.stop()  # answer what is queued, then stop

    api = FastAPI(title="clipret", version=__version__, lifespan=lifespan,
                  description="Image and text search over a clipret gallery. See docs/serve.md.")
    api.state.clipret = state

    @api.exception_handler(RequestError)
    async def refused(_: Any, exc: RequestError) -> JSONResponse:
        metrics.error(exc.kind)
        return JSONResponse(error_body(exc.kind, exc.detail), status_code=exc.status)

    @api.exception_handler(HTTPException)
    async def http_error(_: Any, exc: HTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "bad_request", 413: "too_large"}.get(exc.status_code, "bad_request")
        metrics.error(kind)
        return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Any, exc: RequestValidationError) -> JSONResponse:
        metrics.error("bad_option")
        first = (exc.errors() or [{}])[0]
        return JSONResponse(error_body("bad_option", f"{'.'.join(map(str, first.get('loc', [])))}: {first.get('msg', 'invalid')}"),
                            status_code=422)

    @api.exception_handler(Exception)
    async def crashed(_: Any, exc: Exception) -> JSONResponse:
        metrics.error("internal")
        log.exception("clipret serve: internal error", exc_info=exc)
        return JSONResponse(error_body("internal", "internal error; the server log has the details"), status_code=500)

    routes.add_routes(api, state)
    api.add_middleware(Guard, max_body=settings.max_upload, token=settings.token, metrics=metrics)
    return api
