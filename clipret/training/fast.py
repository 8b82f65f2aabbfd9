"""GPU fast paths for training: TF32, grad checkpointing, channels-last, torch.compile.

Each is a switch of :class:`clipret.config.TrainConfig` and acts where it helps (CUDA, or the
tower kind it is made for); each was checked on the CPU to compute the same thing as the plain
path (tests/test_ddp.py). bf16 autocast (``--amp``) and fused AdamW (on CUDA) live in
:mod:`clipret.runtime` and :mod:`clipret.training.setup`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from clipret import runtime

__all__ = ["CompiledForward", "apply_memory_paths"]


def apply_memory_paths(model: nn.Module, device: torch.device, *, grad_checkpointing: bool, channels_last: bool,
                       tf32: bool) -> list[str]:
    """Switch on the requested paths on ``model`` (a :class:`RetrievalNet`), in place.

    Returns warning lines for switches that cannot act on this model: grad checkpointing on a
    ModifiedResNet tower (open_clip's is a no-op there), channels-last on a ViT (its only 4-D
    weight is the patch embedding). TF32 is set process-wide, for CUDA only.
    """
    warnings: list[str] = []
    runtime.set_tf32(device, tf32)
    tower = getattr(model, "tower", None)
    kind = getattr(tower, "kind", None)
    if grad_checkpointing and tower is not None and not tower.set_grad_checkpointing(True):
        warnings.append("--grad-checkpointing has no effect on ResNet towers (open_clip's ModifiedResNet does not "
                        "implement it); training runs without it")
    if channels_last:
        if kind == "cnn":
            model.to(memory_format=torch.channels_last)
        else:
            warnings.append("--channels-last only helps CNN towers (RN*); ignored for this ViT")
    return warnings


def uses_channels_last(model: nn.Module, channels_last: bool) -> bool:
    """Whether input batches should be converted to channels-last for ``model``."""
    return channels_last and getattr(getattr(model, "tower", None), "kind", None) == "cnn"


class CompiledForward:
    """Call ``module`` through ``torch.compile``; if compiling fails, warn once and run eagerly.

    torch.compile compiles lazily, at the first call: that call is tried, and any exception it
    raises (no compiler, an operator the backend cannot lower, ...) sends every later call to
    the eager ``module``, after one ``on_warning`` line. Failures after the first call are real
    errors and propagate. The backward graph is compiled lazily too, at the first backward; a
    failure there is not caught.
    """

    def __init__(self, module: nn.Module, on_warning: Callable[[str], None], backend: Any = "inductor",
                 **compile_kwargs: Any) -> None:
        self.module = module
        self.on_warning = on_warning
        self.compiled: Any = torch.compile(module, backend=backend, **compile_kwargs)
        self.tried = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.module(*args, **kwargs)
        if self.tried:
            return self.compiled(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compile failure falls back to eager
            self.on_warning(f"--compile failed ({_root_cause(exc)}); training continues without it")
            self.compiled = None
            return self.module(*args, **kwargs)
        self.tried = True
        return out


def _root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost exception (dynamo wraps the backend's own in
    ``BackendCompilerFailed.inner_exception``)."""
    for _ in range(8):  # a cause chain is short; never loop on a cycle
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__
