"""Valid values of the model settings, importable without torch (for CLI choices)."""

from __future__ import annotations

#: ``--pool``: GeM over patch tokens / feature-map cells, the ViT's CLS token, or their mean.
POOLS = ("gem", "cls", "mean")

#: ``--gem-input``: how GeM makes signed ViT tokens non-negative (see clipret.model.pooling).
GEM_INPUTS = ("clamp", "softplus", "shift")
