"""Request bodies -> validated :class:`~clipret.serve.query.Query` values, or a :class:`RequestError` saying why not.

A query is exactly one of: an image (a multipart upload, or base64 in JSON), a vector, an id
already in the gallery, or text; plus optional ``k``, ``qe``, ``rerank`` and ``tta``, each bounded
by :class:`~clipret.serve.settings.Settings`. Images are decoded by the project's hardened decoder
(:func:`clipret.data.decode.load_rgb`: its decompression-bomb guard, EXIF rotation, the first frame
of an animation); these functions block, so the app runs them in a thread, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from clipret.errors import ClipretError, first_line
from clipret.serve.query import KINDS, Query, RequestError

__all__ = ["MAX_TEXT_CHARS", "decode_image", "query_from_json", "query_from_upload", "search_options"]

MAX_TEXT_CHARS = 2000  # the tokenizer keeps 77 tokens anyway; this only bounds the work
MAX_ASPECT = 100  # longer side / shorter side: resizing the shorter side to the model input must stay bounded
OPTION_KEYS = ("k", "qe", "rerank", "tta")
_WHOLE = re.compile(r"-?[0-9]{1,18}")  # a whole number as text (a longer one is out of every range)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def decode_image(data: bytes, min_side: int | None = None) -> Any:
    """Image file bytes -> an RGB PIL image, through :func:`~clipret.data.decode.load_rgb_bytes` (the checks and
    reasons of every image clipret reads; decoded in memory); 400 ``bad_image`` with its reason."""
    from clipret.data.decode import load_rgb_bytes

    try:
        img, reason = load_rgb_bytes(data, min_side=min_side)
    except Exception as exc:  # a hostile file can make a PIL plugin raise anything: still the upload's fault
        img, reason = None, f"corrupt image ({type(exc).__name__}: {first_line(exc)})"
    if img is None:
        raise RequestError(400, "bad_image", f"cannot read the image: {reason}")
    if max(img.size) > MAX_ASPECT * min(img.size):
        raise RequestError(400, "bad_image", f"the image is {img.size[0]}x{img.size[1]} pixels, more than {MAX_ASPECT}:1; "
                           "crop it to the part to search for")
    return img


def _image_from_base64(text: Any, min_side: int | None) -> Any:
    if not isinstance(text, str):
        raise RequestError(400, "bad_image", "'image' must be a base64 string (optionally a data: URL)")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "bad_image", "'image' is not valid base64") from None
    return decode_image(data, min_side)


def _vector(value: Any, dim: int) -> np.ndarray:
    """A list of D finite numbers -> (D,) float32 unit vector; 422 ``bad_vector`` otherwise."""
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise RequestError(422, "bad_vector", "'vector' must be a list of numbers")
    if len(value) != dim:
        raise RequestError(422, "bad_vector", f"'vector' has {len(value)} numbers; the gallery's vectors have {dim}")
    try:
        v = np.asarray(value, dtype=np.float64)
    except (OverflowError, ValueError):
        raise RequestError(422, "bad_vector", "'vector' holds a number too large for a float") from None
    if not np.isfinite(v).all():
        raise RequestError(422, "bad_vector", "'vector' holds NaN or infinity")
    norm = float(np.linalg.norm(v))
    if norm == 0 or not math.isfinite(norm):
        raise RequestError(422, "bad_vector", "'vector' is all zeros (or too large); it needs a direction")
    return (v / norm).astype(np.float32)


def _int(raw: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = raw.get(key)
    value = default if value is None else value
    if isinstance(value, str) and _WHOLE.fullmatch(value.strip()):  # ASCII digits only: int() also takes "²"
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise RequestError(422, "bad_option", f"'{key}' must be a whole number from {low} to {high}, got {shown}")
    return value


def _bool(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key)
    value = False if value is None else value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if not isinstance(value, bool):
        raise RequestError(422, "bad_option", f"'{key}' must be true or false, got {value!r}")
    return value


def search_options(raw: Mapping[str, Any], kind: str, settings: Any, service: Any) -> dict[str, Any]:
    """``k``, ``qe``, ``rerank`` and ``tta`` of one query, checked against the limits; 422 ``bad_option`` otherwise.

    ``tta`` applies to images only and defaults to the gallery's own (TTA should be symmetric).
    Re-ranking reads the whole gallery's neighbour graph, so it is refused on a gallery larger
    than ``settings.rerank_max_gallery``.
    """
    from clipret.embedding.tta import parse_tta

    k = _int(raw, "k", settings.k, 1, settings.max_k)
    qe = _int(raw, "qe", 0, 0, settings.max_qe)
    rerank = _bool(raw, "rerank")
    gallery = service.text_gallery if kind == "text" and service.text_gallery is not None else service.gallery
    if rerank and len(gallery) > settings.rerank_max_gallery:
        raise RequestError(422, "bad_option", f"re-ranking is limited to galleries of {settings.rerank_max_gallery} items "
                           f"per request, and this one holds {len(gallery)}; search without 'rerank'")
    tta = raw.get("tta")
    if tta is not None and kind != "image":
        raise RequestError(422, "bad_option", "'tta' applies to image queries only")
    if kind == "image":
        if tta is not None and not isinstance(tta, str):
            raise RequestError(422, "bad_option", "'tta' must be none, flip or flip,scales")
        try:
            tta = parse_tta(tta if tta is not None else gallery.flags.get("tta"))
        except ClipretError:
            raise RequestError(422, "bad_option", f"unknown 'tta' {tta!r}; use none, flip or flip,scales") from None
    return {"k": k, "qe": qe, "rerank": rerank, "tta": tta}


def query_from_json(obj: Any, settings: Any, service: Any, min_side: int | None = None) -> Query:
    """A JSON object with exactly one of ``image`` (base64), ``vector``, ``id``, ``text``, plus options -> Query."""
    if not isinstance(obj, dict):
        raise RequestError(400, "bad_request", "a query is a JSON object such as {\"text\": \"a red dress\", \"k\": 10}")
    unknown = sorted(set(obj) - set(KINDS) - set(OPTION_KEYS))
    if unknown:
        raise RequestError(422, "bad_option", f"unknown field {unknown[0]!r}; a query takes one of {', '.join(KINDS)} "
                           f"and the options {', '.join(OPTION_KEYS)}")
    given = [kind for kind in KINDS if obj.get(kind) is not None]
    if len(given) != 1:
        raise RequestError(400, "bad_request", f"give exactly one of {', '.join(KINDS)} per query, got "
                           f"{', '.join(given) or 'none'}")
    kind = given[0]
    options = search_options(obj, kind, settings, service)
    value = obj[kind]
    if kind == "image":
        value = _image_from_base64(value, min_side)
    elif kind == "vector":
        value = _vector(value, service.dim)
    elif kind == "id":
        if not isinstance(value, str) or not service.has_id(value):
            raise RequestError(404, "unknown_id", f"no item {str(value)[:200]!r} in the gallery")
    elif not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT_CHARS:
        raise RequestError(422, "bad_option", f"'text' must be a non-blank string of at most {MAX_TEXT_CHARS} characters")
    return Query(kind, value, **options)


def query_from_upload(data: bytes, fields: Mapping[str, Any], settings: Any, service: Any,
                      min_side: int | None = None) -> Query:
    """A multipart upload's bytes and its form fields (the options) -> an image Query."""
    unknown = sorted(set(fields) - set(OPTION_KEYS))
    if unknown:
        raise RequestError(422, "bad_option", f"unknown form field {unknown[0]!r}; send 'image' (the file) and the "
                           f"options {', '.join(OPTION_KEYS)}")
    options = search_options(dict(fields), "image", settings, service)
    return Query("image", decode_image(data, min_side), **options)

