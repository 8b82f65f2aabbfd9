"""The request and response shapes, as pydantic models: what ``/docs`` (OpenAPI) shows.

The handlers read bodies themselves (a search takes multipart *or* JSON, and every refusal is a
:class:`~clipret.serve.query.RequestError` with its own status), so these models document the
contract; :func:`search_body` and :func:`batch_body` put both content types into the schema.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field

__all__ = ["BatchRequest", "BatchResponse", "Problem", "SearchRequest", "SearchResponse", "batch_body", "search_body"]


class SearchRequest(BaseModel):
    """One query: exactly one of image, vector, id or text, plus options."""

    image: Optional[str] = Field(None, description="An image file, base64-encoded (a data: URL is accepted).")
    vector: Optional[list[float]] = Field(None, description="A D-dimensional query vector (normalised to unit length).")
    id: Optional[str] = Field(None, description="An id already in the gallery: its neighbours, itself left out.")
    text: Optional[str] = Field(None, description="Text, embedded by the zero-shot CLIP text tower.")
    k: Optional[int] = Field(None, description="Results to return (default: the server's --k).")
    qe: int = Field(0, description="Query expansion: average the query with its top-N gallery items (0: off).")
    rerank: bool = Field(False, description="k-reciprocal re-ranking (small galleries only).")
    tta: Optional[str] = Field(None, description="Image queries only: none, flip or flip,scales (default: the gallery's).")


class BatchRequest(BaseModel):
    """Several queries in one call; each is answered as /search would answer it."""

    queries: list[SearchRequest]


class SearchResponse(BaseModel):
    """Gallery ids best first, their scores (higher is better), the stages used and the time taken."""

    ids: list[str]
    scores: list[float]
    stages: dict[str, Any]
    gallery: str = Field(description="image, or text (the gallery text queries search).")
    batch: int = Field(description="Queries in the micro-batch this one was embedded with.")
    took_ms: float


class BatchResponse(BaseModel):
    """One answer per query, in order, and the time the whole call took."""

    results: list[SearchResponse]
    took_ms: float


class Problem(BaseModel):
    """Why a request was refused: a short machine-readable kind and a one-line detail."""

    kind: str
    detail: str


_OPTIONS = {name: {"type": "string"} for name in ("k", "qe", "rerank", "tta")}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` resolved in place (a request body cannot refer to them)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


def search_body() -> dict[str, Any]:
    """``openapi_extra`` for POST /search: JSON (:class:`SearchRequest`) or a multipart upload."""
    multipart = {"type": "object", "required": ["image"],
                 "properties": {"image": {"type": "string", "format": "binary"}, **_OPTIONS}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline(SearchRequest)},
                                                          "multipart/form-data": {"schema": multipart}}}}


def batch_body() -> dict[str, Any]:
    """``openapi_extra`` for POST /search/batch: JSON (:class:`BatchRequest`) or several uploads sharing the options."""
    multipart = {"type": "object", "required": ["image"],
                 "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}, **_OPTIONS}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _inline(BatchRequest)},
                                                          "multipart/form-data": {"schema": multipart}}}}
