"""The one place that imports faiss: the optional extra, its threads and its GPUs.

faiss is an optional dependency (``pip install 'clipret[faiss]'``, or
``faiss-gpu`` from pip/conda on CUDA machines: both provide the same ``faiss``
module). It is imported inside functions only, so nothing pays for it until
an index is built or searched.
"""

from __future__ import annotations

import os
from typing import Any

from clipret.errors import ClipretError

MISSING = "faiss is not installed; install it with `pip install 'clipret[faiss]'` (or faiss-gpu on CUDA machines)"
GPU_MAX_K = 2048  # faiss GPU search returns at most this many neighbours


def import_faiss() -> Any:
    """The faiss module, or a one-line :class:`ClipretError` naming the extra."""
    try:
        import faiss
    except ImportError:
        raise ClipretError(MISSING) from None
    return faiss


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def numpy_method(obj: Any, name: str) -> Any:
    """``obj.<name>`` as faiss's own numpy wrapper defines it (``obj`` an index or the faiss module).

    ``faiss.contrib.torch_utils`` (imported by pytorch-metric-learning, so by any
    process that trains) replaces ``search``, ``remove_ids``, ``knn`` ... with
    versions that drop search parameters and IDSelectors and send anything but an
    exact ``np.ndarray`` down a torch path; it keeps the originals as
    ``<name>_numpy``. This is the one place that relies on that name (checked with
    faiss-cpu 1.15.1; tests/test_index.py runs the index paths under torch_utils).
    """
    return getattr(obj, name + "_numpy", None) or getattr(obj, name)


def set_threads(threads: int | None) -> int:
    """Set FAISS's OpenMP threads (default: every CPU this process may use); return the number."""
    from clipret.runtime import available_cpus

    if threads is not None and threads < 1:
        raise ClipretError(f"--threads must be at least 1, got {threads}")
    n = threads or available_cpus()
    import_faiss().omp_set_num_threads(n)
    return n


def gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu, or when ``CLIPRET_FAISS_GPU=0``."""
    if os.environ.get("CLIPRET_FAISS_GPU", "") == "0":
        return 0
    faiss = import_faiss()
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:  # noqa: BLE001 - a CUDA driver problem must not break CPU search
        return 0


_resources: Any = None


def gpu_resources() -> Any:
    """One ``StandardGpuResources`` (scratch memory, streams) shared by every GPU search in this process."""
    global _resources
    if _resources is None:
        _resources = import_faiss().StandardGpuResources()
    return _resources


def to_gpu(index: Any) -> Any | None:
    """A copy of a CPU ``index`` on GPU 0, or None when there is no GPU or faiss-gpu cannot take it."""
    if gpu_count() == 0:
        return None
    try:
        return import_faiss().index_cpu_to_gpu(gpu_resources(), 0, index)
    except Exception:  # noqa: BLE001 - an index type or parameter this GPU build lacks: stay on the CPU
        return None
