"""The search service: the image encoder, the gallery and (optionally) a text tower with its gallery, loaded once.

:meth:`SearchService.run` answers a list of :class:`~clipret.serve.query.Query` with one forward
pass per kind of input (the images of a micro-batch go through :meth:`clipret.Encoder.embed`
together, the texts through :meth:`clipret.TextEncoder.embed_text`), then one
:func:`clipret.retrieve` call per group of queries that ask for the same stages. k-reciprocal
re-ranking is transductive (a query's result depends on the others in its call), so each
re-ranked query is searched alone and its answer does not depend on who shared its batch.

It is called from one worker thread at a time (:mod:`clipret.serve.batcher`); nothing here
knows about HTTP.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipret.errors import ClipretError, first_line
from clipret.serve.query import Query, RequestError
from clipret.serve.settings import Settings

__all__ = ["Answer", "SearchService"]


@dataclass
class Answer:
    """One query's answer: gallery ``ids`` best first, their ``scores`` (higher is better), the
    ``stages`` that ran, which ``gallery`` was searched (``image`` or ``text``) and the size of the
    micro-batch the query was embedded in (``batch``)."""

    ids: list[str]
    scores: list[float]
    stages: dict[str, Any]
    gallery: str
    batch: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of one answer (the route adds ``took_ms``)."""
        return {"ids": self.ids, "scores": self.scores, "stages": self.stages, "gallery": self.gallery, "batch": self.batch}


class SearchService:
    """What one ``clipret serve`` process holds: ``encoder`` + ``gallery`` for image, vector and id
    queries, and ``text`` (a :class:`~clipret.embedding.text.TextEncoder`) + ``text_gallery`` for
    text queries, or ``text_refusal``, the one-line reason text queries are refused."""

    def __init__(self, encoder: Any, gallery: Any, text: Any = None, text_gallery: Any = None,
                 text_refusal: str | None = None) -> None:
        self.encoder, self.gallery = encoder, gallery
        self.text, self.text_gallery = text, text_gallery
        self.text_refusal = text_refusal or "text queries are not set up on this server"
        self._rows = {item: row for row, item in enumerate(gallery.ids)}
        self._text_ids = self._rows if text_gallery is None or text_gallery is gallery else frozenset(text_gallery.ids)
        from clipret.data.decode import decode_side_for

        #: uploads that are JPEGs much larger than the model input decode at a reduced scale, as `clipret embed` does
        self.decode_side = decode_side_for(encoder.spec.preprocess.get("size", 224))

    @classmethod
    def load(cls, settings: Settings) -> SearchService:
        """Open the gallery and the model (and the text side) of ``settings``; ClipretError (one line) if they do not fit."""
        from clipret.embedding.encoder import Encoder
        from clipret.retrieval.gallery import open_gallery

        gallery = open_gallery(settings.gallery)
        is_run = Path(settings.model).is_dir()
        encoder = Encoder.load(settings.model, None if is_run else settings.pretrained, device=settings.device, amp=settings.amp)
        if encoder.dim != gallery.dim or (gallery.fingerprint and gallery.fingerprint != encoder.fingerprint):
            raise ClipretError(f"{settings.gallery} was not embedded by --model {settings.model} (fingerprints "
                               f"{gallery.fingerprint} vs {encoder.fingerprint}); pass the model that embedded it")
        text, text_gallery, refusal = _load_text_side(settings, gallery, is_run)
        return cls(encoder, gallery, text, text_gallery, refusal)

    @property
    def dim(self) -> int:
        """D of the image gallery (what a vector query must have)."""
        return int(self.gallery.dim)

    def has_id(self, item: str) -> bool:
        """True when ``item`` is an id of the image gallery (an id query may name it)."""
        return item in self._rows

    def item_file(self, item: str) -> Path | None:
        """The image file of a gallery id, for its thumbnail (:func:`clipret.serve.thumbs.item_path`), or None."""
        from clipret.serve.thumbs import item_path

        for ids, gal in ((self._rows, self.gallery), (self._text_ids, self.text_gallery)):
            found = item_path(item, ids, gal.root) if gal is not None else None
            if found is not None:
                return found
        return None

    def run(self, queries: list[Query]) -> list[Answer | RequestError]:
        """Answer every query, in order; a query that cannot be answered gets its :class:`RequestError`."""
        vectors: list[np.ndarray | None] = [None] * len(queries)
        out: list[Answer | RequestError | None] = [None] * len(queries)
        by_tta: dict[str | None, list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            if q.kind == "image":
                by_tta[q.tta].append(i)
            elif q.kind == "vector":
                vectors[i] = np.asarray(q.value, dtype=np.float32)
            elif q.kind == "id":
                vectors[i] = self._gallery_row(q.value)
        for tta, idx in by_tta.items():
            self._embed_images(queries, idx, tta, vectors, out)
        texts = [i for i, q in enumerate(queries) if q.kind == "text"]
        if texts and self.text is None:
            for i in texts:
                out[i] = RequestError(400, "no_text", self.text_refusal)
        elif texts:
            emb = self.text.embed_text([queries[i].value for i in texts])
            for j, i in enumerate(texts):
                vectors[i] = emb.vectors[j]
        for idx in _search_groups(queries, out):
            self._search(queries, idx, vectors, out)
        return [a if a is not None else RequestError(500, "internal", "no answer") for a in out]

    def _embed_images(self, queries: list[Query], idx: list[int], tta: str | None, vectors: list[Any], out: list[Any]) -> None:
        """One forward pass for the images ``idx``; if it fails, each image alone, so one bad image fails only itself."""
        try:
            rows = self.encoder.embed([queries[i].value for i in idx], tta=tta, batch_size=max(1, len(idx))).vectors
        except Exception:  # noqa: BLE001 - which image broke the batch is found below
            for i in idx:
                try:
                    vectors[i] = self.encoder.embed([queries[i].value], tta=tta).vectors[0]
                except Exception as exc:  # noqa: BLE001 - an image the model cannot take is the request's problem
                    out[i] = RequestError(400, "bad_image", f"cannot embed the image ({type(exc).__name__}: {first_line(exc)})")
            return
        for j, i in enumerate(idx):
            vectors[i] = rows[j]

    def _gallery_row(self, item: str) -> np.ndarray:
        row = self._rows[item]
        if self.gallery.index is not None:
            v = self.gallery.index.searcher.vectors(np.array([row]))[0]
        else:
            v = np.array(self.gallery.vectors[row], dtype=np.float32)
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def _search(self, queries: list[Query], idx: list[int], vectors: list[Any], out: list[Any]) -> None:
        """One :func:`clipret.retrieve` call for queries that share their stages; an id query never lists itself."""
        from clipret.api import retrieve
        from clipret.artifacts.embeddings import Embeddings

        first = queries[idx[0]]
        side = "text" if first.kind == "text" else "image"
        gal = self.text_gallery if side == "text" else self.gallery
        own = any(queries[i].kind == "id" for i in idx)
        k = max(queries[i].k for i in idx) + (1 if own else 0)
        # The model and TTA were checked when the service was loaded: the query side carries the gallery's.
        q = Embeddings(np.stack([vectors[i] for i in idx]).astype(np.float32), [f"query {i}" for i in idx],
                       fingerprint=gal.fingerprint, flags={"tta": gal.flags.get("tta")})
        try:
            res = retrieve(q, gal, k=k, qe=first.qe, rerank=first.rerank, keep_self=True)
        except ClipretError as exc:
            for i in idx:
                out[i] = RequestError(400, "bad_request", str(exc))
            return
        for j, i in enumerate(idx):
            query = queries[i]
            pairs = [(g, float(s)) for g, s in zip(res.ids[j], res.scores[j]) if not (query.kind == "id" and g == query.value)]
            stages = {"embed": _embedded_by(query), "tta": query.tta, **res.meta["stages"]}
            out[i] = Answer([g for g, _ in pairs[: query.k]], [s for _, s in pairs[: query.k]], stages, side, len(queries))


def _embedded_by(query: Query) -> str | None:
    return {"image": "image tower", "text": "text tower"}.get(query.kind)


def _search_groups(queries: list[Query], done: list[Any]) -> list[list[int]]:
    """Indices of the queries still to answer, grouped by (gallery, qe); each re-ranked query alone."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        if done[i] is None:
            key = ("alone", i) if q.rerank else (q.kind == "text", q.qe)
            groups[key].append(i)
    return list(groups.values())


def _load_text_side(settings: Settings, gallery: Any, is_run: bool) -> tuple[Any, Any, str | None]:
    """(TextEncoder, text gallery, None), or (None, None, why text queries are refused).

    ``--text-gallery``/``--text-model`` given: they must work (ClipretError otherwise); without
    ``--text-model``, the model and weights the text gallery's manifest records are used. Neither
    given: text queries search the main gallery with the main model when that is a zero-shot
    CLIP model whose image tower embedded it; otherwise they are refused with what to do.
    """
    from clipret.embedding.text import TextEncoder, fine_tuned_refusal, is_fine_tuned
    from clipret.retrieval.gallery import open_gallery

    explicit = settings.text_model is not None or settings.text_gallery is not None
    text_gallery = open_gallery(settings.text_gallery) if settings.text_gallery is not None else gallery
    model, pretrained = settings.text_model, settings.pretrained
    if model is None and settings.text_gallery is not None and not is_fine_tuned(text_gallery.flags):
        model = text_gallery.flags.get("model")
        pretrained = pretrained or text_gallery.flags.get("pretrained")
    elif model is None and not is_run:
        model = settings.model
    if model is None:
        if explicit:
            raise ClipretError(fine_tuned_refusal(settings.text_gallery, text_gallery.root, text_gallery.flags))
        return None, None, fine_tuned_refusal(settings.gallery, gallery.root, gallery.flags)
    try:
        text = TextEncoder.load(str(model), pretrained, device=settings.device, amp=settings.amp)
        text.check_gallery(text_gallery)
    except ClipretError as exc:
        if explicit:
            raise
        return None, None, str(exc)
    return text, text_gallery, None
