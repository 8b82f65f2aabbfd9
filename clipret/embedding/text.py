"""The public :class:`TextEncoder`: a zero-shot CLIP model's tokenizer and text tower, texts -> (N, D) rows.

CLIP trains its text tower into the same space as its image tower, so a text query can search a
gallery that *the same zero-shot model* embedded (``clipret embed DIR --model ViT-B-32 --pretrained
TAG``). A fine-tuned head (a ``clipret train`` run) maps images into a new space that no text tower
shares: :meth:`TextEncoder.check_gallery` refuses such a gallery in one line that says what to do.

"The same zero-shot model" is decided by fingerprints: a text encoder carries the fingerprint the
image embeddings of its model and weights get (:func:`clipret.model.build.open_encoder`), and a
gallery's manifest records the fingerprint of the model that embedded it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipret.artifacts.embeddings import Embeddings
from clipret.errors import ClipretError, first_line

__all__ = ["TextEncoder", "fine_tuned_refusal", "is_fine_tuned", "zero_shot_gallery_hint"]

PathLike = str | os.PathLike[str]

# The image tower CLIP's constructor always builds, shrunk to almost nothing: only the text tower is used.
_STUB_VISION_CFG = {"image_size": 8, "patch_size": 8, "layers": 1, "width": 8, "head_width": 8, "mlp_ratio": 1.0}


def zero_shot_gallery_hint(root: Any = None, model: str = "ViT-B-32", pretrained: str | None = "TAG") -> str:
    """The command that embeds a gallery text queries can search: ``clipret embed DIR --model M --pretrained T --out g0.npy``."""
    return f"clipret embed {root or 'DIR'} --model {model} --pretrained {pretrained or 'TAG'} --out g0.npy"


def is_fine_tuned(flags: Any) -> bool:
    """True when an embeddings manifest's flags say a fine-tuned head made them (no text tower shares that space)."""
    model = (flags or {}).get("model")
    return (flags or {}).get("pool") not in (None, "clip") or bool(model and Path(str(model)).is_dir())


def fine_tuned_refusal(where: Any, root: Any, flags: Any, model: str | None = None, pretrained: str | None = None) -> str:
    """The one line that refuses a text query against a fine-tuned gallery, and says what to do instead."""
    return (f"{where} was embedded by a fine-tuned model ({(flags or {}).get('model')}), whose space has no text tower; "
            f"embed a zero-shot gallery as well (`{zero_shot_gallery_hint(root, model or 'ViT-B-32', pretrained or 'TAG')}`) "
            "and search that one with text (`clipret serve` takes it with --text-gallery)")


class TextEncoder:
    """open_clip's tokenizer and text tower of a zero-shot CLIP model: texts -> (N, D) float32 unit rows.

    The rows live in the space of the same model's image embeddings (``Encoder.load(model,
    pretrained)``); ``fingerprint`` is the fingerprint those image embeddings carry, so a query
    made here passes :func:`clipret.retrieve`'s model check against such a gallery.
    """

    def __init__(self, model: str, pretrained: str, module: Any, tokenizer: Any, fingerprint: str, dim: int, *,
                 device: str = "auto", amp: str = "auto") -> None:
        self.model, self.pretrained = model, pretrained
        self.module, self.tokenizer, self.fingerprint, self._dim = module, tokenizer, fingerprint, int(dim)
        self.device, self.amp = device, amp

    @classmethod
    def load(cls, model: PathLike, pretrained: str | None = None, *, device: str = "auto", amp: str = "auto") -> TextEncoder:
        """Open the text tower of ``model`` (an open_clip name or config JSON) with ``pretrained`` weights.

        A run folder from ``clipret train`` has no text tower: a one-line :class:`ClipretError`.
        ``pretrained none`` builds random weights (the same ones every time), as ``Encoder`` does.
        """
        import torch

        from clipret.model import backbone
        from clipret.model.build import zero_shot_fingerprint, make_spec

        if Path(model).is_dir():
            raise ClipretError(f"{model} is a fine-tuned run: its embedding space has no text tower; text queries need "
                               f"a zero-shot CLIP model and a gallery it embedded (`{zero_shot_gallery_hint()}`)")
        spec = make_spec(str(model), pretrained, pool="clip")
        text_cfg = dict(spec.clip_config.get("text_cfg") or {})
        if not text_cfg or "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
            raise ClipretError(f"{model} has no open_clip text transformer clipret can build offline "
                               "(Hugging Face text towers are not supported); pick a CLIP model such as ViT-B-32")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # with --pretrained none, the same random weights every time
            module = _build_text_model(spec, text_cfg)
        path = backbone.fetch_weights(spec.backbone, spec.pretrained)
        if path is not None:
            from clipret import artifacts

            _load_text_weights(module, artifacts.load_weights_file(path), str(model))
        return cls(str(model), spec.pretrained, module.eval(), _tokenizer(spec.backbone, text_cfg),
                   zero_shot_fingerprint(spec), spec.clip_config["embed_dim"], device=device, amp=amp)

    @property
    def dim(self) -> int:
        """D, the embedding width (the same as the image tower's)."""
        return self._dim

    def embed_text(self, texts: Sequence[str], *, batch_size: int = 256) -> Embeddings:
        """Tokenize and embed ``texts``, in order: -> (N, D) float32 L2-normalised rows; ids are the texts.

        An empty or blank text is a :class:`ClipretError`. Text longer than the model's context
        (77 tokens for CLIP) is cut, as open_clip's tokenizer does.
        """
        import torch

        from clipret import runtime

        texts = [str(t) for t in texts]
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:
            raise ClipretError(f"text query {blank[0]} is empty; give some words to search for")
        device = runtime.resolve_device(self.device)
        amp = runtime.resolve_amp(self.amp, device)
        module = self.module.to(device).eval()
        rows = []
        for start in range(0, len(texts), max(1, batch_size)):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(device)
            with torch.inference_mode(), runtime.autocast(device, amp):
                out = module.encode_text(tokens)
            rows.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy())
        vectors = np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
        flags = {"model": self.model, "pretrained": self.pretrained, "text": True, "tta": None}
        return Embeddings(vectors.astype(np.float32, copy=False), texts, fingerprint=self.fingerprint, flags=flags)

    def check_gallery(self, gallery: Any, *, allow_mismatch: bool = False) -> list[str]:
        """Refuse (one-line :class:`ClipretError`) a gallery that this model's image tower did not embed.

        ``gallery``: a :class:`~clipret.retrieval.gallery.Gallery` or :class:`Embeddings` (anything with
        ``fingerprint``, ``flags``, ``path`` and ``root``). ``allow_mismatch`` turns the refusal into a
        returned warning line.
        """
        if gallery.fingerprint == self.fingerprint:
            return []
        flags = dict(gallery.flags or {})
        where = gallery.path or "the gallery"
        fix = f"embed a zero-shot gallery as well (`{zero_shot_gallery_hint(gallery.root, self.model, self.pretrained)}`)"
        if not gallery.fingerprint:
            msg = f"{where} records no model fingerprint, so it cannot be known to share {self.model}'s text space; {fix}"
        elif is_fine_tuned(flags):
            msg = fine_tuned_refusal(where, gallery.root, flags, self.model, self.pretrained)
        else:
            msg = (f"{where} was embedded by another model ({flags.get('model')}, --pretrained {flags.get('pretrained')}) "
                   f"than {self.model} --pretrained {self.pretrained}; pass that model, or {fix}")
        if not allow_mismatch:
            raise ClipretError(msg)
        return [msg]


def _build_text_model(spec: Any, text_cfg: dict[str, Any]) -> Any:
    """open_clip's CLIP (or CustomTextCLIP) with the config's text tower and a stub image tower, random weights."""
    import open_clip

    kind = open_clip.CustomTextCLIP if spec.clip_config.get("custom_text") else open_clip.CLIP
    return kind(embed_dim=spec.clip_config["embed_dim"], vision_cfg=_STUB_VISION_CFG, text_cfg=text_cfg,
                quick_gelu=spec.quick_gelu)


def _load_text_weights(module: Any, state: dict[str, Any], model: str) -> None:
    """Load the text-tower part of an open_clip CLIP state dict (every ``visual.*`` key is ignored)."""
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    text_state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    wanted = {k for k in module.state_dict() if not k.startswith("visual.")}
    try:
        missing, _ = module.load_state_dict(text_state, strict=False)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "shape mismatch")
        raise ClipretError(f"the weights' text tower does not fit {model} ({first[:200]}); check that --model matches the weights") from None
    missing = sorted(set(missing) & wanted - {"logit_scale", "logit_bias"})
    if missing:
        raise ClipretError(f"the weights hold no text tower for {model} ({len(missing)} missing keys, e.g. {missing[0]}); "
                           "text queries need full CLIP weights, not an image-tower-only file")


def _tokenizer(name: str, text_cfg: dict[str, Any]) -> Any:
    """open_clip's tokenizer for a registered model name; CLIP's own BPE tokenizer for a config file."""
    import open_clip

    if open_clip.get_model_config(name) is not None:
        try:
            return open_clip.get_tokenizer(name)
        except Exception as exc:  # a Hugging Face tokenizer that cannot be fetched offline, in many error types
            raise ClipretError(f"cannot open the tokenizer of {name} ({first_line(exc)}); text queries need "
                               "open_clip's own tokenizer, or the Hugging Face one in the local cache") from None
    return open_clip.SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)),
                                     **dict(text_cfg.get("tokenizer_kwargs") or {}))
