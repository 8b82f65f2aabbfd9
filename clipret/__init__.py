"""clipret: train and serve CLIP-based image retrieval.

The public Python API is small and imports nothing heavy at import time: torch, open_clip
and faiss load only when a function needs them (each name below is imported on first use).

>>> import clipret
>>> sorted(clipret.__all__)[:3]
['ClipretError', 'Embeddings', 'Encoder']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clipret.errors import ClipretError

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use)
_LAZY = {
    "Encoder": "clipret.embedding.encoder",
    "Embeddings": "clipret.artifacts.embeddings",
    "Gallery": "clipret.retrieval.gallery",
    "Results": "clipret.retrieval.results",
    "Stages": "clipret.retrieval.pipeline",
    "TextEncoder": "clipret.embedding.text",
    "TrainConfig": "clipret.config",
    "retrieve": "clipret.api",
    "evaluate": "clipret.api",
    "train": "clipret.api",
}

__all__ = ["ClipretError", "__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time each name loads on first use
    from clipret.api import evaluate, retrieve, train
    from clipret.artifacts.embeddings import Embeddings
    from clipret.config import TrainConfig
    from clipret.embedding.encoder import Encoder
    from clipret.embedding.text import TextEncoder
    from clipret.retrieval.gallery import Gallery
    from clipret.retrieval.pipeline import Stages
    from clipret.retrieval.results import Results


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clipret' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
