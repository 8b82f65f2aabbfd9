"""The public :class:`Encoder`: a model opened once, turning images into (N, D) float32 unit rows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from clipret.artifacts.embeddings import Embeddings
from clipret.errors import ClipretError
from clipret.progress import StageProgress as Progress
from clipret.progress import stage_counter

__all__ = ["Encoder"]

PathLike = str | os.PathLike[str]


class Encoder:
    """A model that turns images into (N, D) float32 L2-normalised rows.

    Load it with :meth:`load`: a run folder from ``clipret train``, an open_clip model name
    with ``pretrained`` weights (zero-shot CLIP), or an open_clip config JSON.
    """

    def __init__(self, model: str, pretrained: str | None, module: Any, spec: Any, fingerprint: str, *,
                 device: str = "auto", amp: str = "auto") -> None:
        self.model, self.pretrained = model, pretrained
        self.module, self.spec, self.fingerprint = module, spec, fingerprint
        self.device, self.amp = device, amp

    @classmethod
    def load(cls, model: PathLike, pretrained: str | None = None, *, device: str = "auto", amp: str = "auto") -> Encoder:
        """Open ``model`` (run folder, open_clip name, or config JSON) once, on ``device``."""
        from clipret.model.build import open_encoder

        module, spec, fingerprint = open_encoder(str(model), pretrained)
        return cls(str(model), pretrained, module, spec, fingerprint, device=device, amp=amp)

    @property
    def dim(self) -> int:
        """D, the embedding width."""
        return int(self.module.embed_dim)

    def embed(self, images: Sequence[Any], *, tta: str | None = None, batch_size: int = 64) -> Embeddings:
        """Embed paths, PIL images or (H, W, 3) uint8 arrays, in order: -> (N, D) float32 unit rows.

        Ids are the paths as given, and the position ("0", "1", ...) for in-memory images. An
        image that cannot be read is a :class:`ClipretError` naming it (use :meth:`embed_folder`
        to skip bad files instead). ``tta``: None, "flip" or "flip,scales".
        """
        import torch

        from clipret import runtime
        from clipret.embedding.batches import encode_batch
        from clipret.embedding.tta import parse_tta, tta_transform

        mode = parse_tta(tta)
        transform = tta_transform(self.spec.preprocess, mode)
        device = runtime.resolve_device(self.device)
        amp = runtime.resolve_amp(self.amp, device)
        module = self.module.to(device).eval()
        ids, rows = [], []
        for start in range(0, len(images), max(1, batch_size)):
            chunk = [_as_rgb(x, start + i) for i, x in enumerate(images[start : start + batch_size])]
            batch = torch.stack([transform(img) for _, img in chunk]).to(device)
            rows.append(encode_batch(module, batch, device, amp).cpu().numpy())
            ids += [name for name, _ in chunk]
        vectors = np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
        return Embeddings(vectors.astype(np.float32, copy=False), ids, fingerprint=self.fingerprint,
                          flags=self._flags(mode))

    def embed_folder(self, folder: PathLike, *, tta: str | None = None, out: PathLike | None = None,
                     progress: Progress | None = None, **options: Any) -> Embeddings:
        """Every image under ``folder``, in id order, as ``clipret embed`` makes them (bad files skipped
        and listed in ``.skipped``). With ``out`` (a .npy path) the file and its manifest are written too.

        ``folder`` may be a dataset CSV (``path,label,split[,is_query,is_gallery]``): its gallery
        rows, or ``rows="query"`` (``validation``, ``train``, ``all``). ``options``: batch_size,
        workers, strict, resume, overwrite, shard_size, dba, exact_decode, decode (``auto``, ``gpu``, ``pil``), rows. ``progress(stage,
        done, total)`` is called with stage ``"embed"`` (under torchrun: this rank's share), and before
        it with stage ``"check"`` while ``strict`` checks every image.
        """
        from clipret.embedding.folder import embed_folder

        advance: list[Any] = [None]

        def on_start(n: int) -> None:  # the count is known once the folder is listed
            advance[0] = stage_counter(progress, "embed", n)
            if progress is not None:
                progress("embed", 0, n)

        def on_batch(n: int) -> None:
            advance[0](n)

        return embed_folder(folder, self.model, self.pretrained, out=out, tta=tta, device=self.device, amp=self.amp,
                            on_start=on_start, on_batch=on_batch if progress is not None else None,
                            opened=(self.module, self.spec, self.fingerprint), on_check=progress, **options)

    def _flags(self, tta: str | None) -> dict[str, Any]:
        return {"model": self.model, "pretrained": self.spec.pretrained, "pool": self.spec.pool,
                "image_size": self.spec.preprocess.get("size"), "tta": tta, "dba": None, "exact_decode": False}


def _as_rgb(item: Any, position: int) -> tuple[str, Any]:
    """(id, RGB PIL image) of a path, a PIL image or an (H, W, 3) uint8 array."""
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        from clipret.data.decode import load_rgb

        img, reason = load_rgb(item)
        if img is None:
            raise ClipretError(f"cannot read {item}: {reason}")
        return str(item), img
    if isinstance(item, Image.Image):
        return str(position), item.convert("RGB")
    array = np.asarray(item)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ClipretError(f"image {position} is a {array.dtype} array of shape {array.shape}; "
                           "pass (H, W, 3) uint8 RGB arrays, PIL images or paths")
    return str(position), Image.fromarray(array, "RGB")


