"""Model FLOP utilisation (MFU) for bench/train.py: the cards' dense peaks, and a step's FLOPs.

MFU = (FLOPs of one training step, counted by ``torch.utils.flop_counter.FlopCounterMode``)
/ (step seconds) / (the card's dense peak FLOP/s for the step's precision).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Dense peak TFLOP/s (no structured sparsity) per precision, from NVIDIA's datasheets: "NVIDIA H100 Tensor Core
# GPU" (SXM5, PCIe and NVL columns), "NVIDIA H200 Tensor Core GPU" (SXM and NVL) and "NVIDIA A100 Tensor Core GPU"
# (SXM and PCIe, 40 and 80 GB: the same tensor-core peaks). Their TF32/BF16 tensor-core figures are quoted "with
# sparsity" and are halved here; fp32 is the non-tensor-core FP32 figure. The H200 has the H100's compute.
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def card_of(gpu_name: str | None) -> str | None:
    """The :data:`PEAK_TFLOPS` row of a ``torch.cuda.get_device_name()`` (e.g. "NVIDIA H100 80GB HBM3" -> "H100 SXM")."""
    name = (gpu_name or "").upper()
    for chip in ("H200", "H100"):
        if chip in name:
            return f"{chip} NVL" if "NVL" in name else f"{chip} PCIe" if "PCIE" in name else f"{chip} SXM"
    return "A100" if "A100" in name else None


def precision_of(flags: set[str]) -> str:
    """The peak a variant's matmuls run at: bf16 (autocast), tf32, else fp32."""
    return "bf16" if "bf16" in flags else "tf32" if "tf32" in flags else "fp32"


def peak_tflops(gpu_name: str | None, flags: set[str], override: float | None = None) -> float | None:
    """Dense peak TFLOP/s for the variant on this card: ``override`` if given, else :data:`PEAK_TFLOPS`; None if unknown."""
    if override:
        return float(override)
    card = card_of(gpu_name)
    return PEAK_TFLOPS[card][precision_of(flags)] if card else None


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions, attention; forward and backward), by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())
