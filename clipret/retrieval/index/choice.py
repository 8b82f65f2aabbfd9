"""Which FAISS index to build: default parameters, memory estimates, expected recall, ``auto``.

Pure functions over sizes; nothing here imports faiss, so the choice can be
printed (and tested) without it.

Index types (all inner product over L2-normalised rows):

* ``flat``  exact search; memory 4·D bytes a vector.
* ``hnsw``  graph (``IndexHNSWFlat``); full vectors plus about 8·M bytes of links a vector.
* ``ivf``   inverted lists over k-means cells (``IndexIVFFlat``); full vectors plus an 8-byte id.
* ``ivfpq`` inverted lists of product-quantised codes (``IndexIVFPQ``); m·nbits/8 bytes plus an
  8-byte id a vector. Lossy: far smaller, far lower recall.

``--m`` means the HNSW graph degree for ``hnsw`` and the number of PQ sub-quantizers for ``ivfpq``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from clipret.errors import ClipretError

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")
AUTO_FLAT_BELOW = 100_000  # auto: exact search below this many vectors, an approximate index from here

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 128
HNSW_EF_SEARCH = 256
IVF_MIN_NPROBE = 32
PQ_NBITS = 8
TRAIN_POINTS_PER_LIST = 64  # k-means sample: 64 points a cell (faiss warns below 39)

# Expected recall@10 against exact search at the default search parameters, measured at 1M vectors by
#   flock /tmp/clipret-bench.lock python bench/search.py --sizes 100000 1000000 --sweep --pq-m 16 32 64 128
# on its clustered D=256 vectors (docs/benchmarks.md; 100k gave hnsw 0.998, ivf 0.998). ivfpq is keyed by
# code bytes per dimension (m·nbits/8 / D); a size between the measured ones takes the lower one's recall,
# a smaller one half the smallest.
EXPECTED_RECALL = {"flat": 1.0, "hnsw": 0.991, "ivf": 0.998}
EXPECTED_RECALL_PQ = {0.5: 0.872, 0.25: 0.601, 0.125: 0.355, 0.0625: 0.201}


@dataclass(frozen=True)
class IndexPlan:
    """An index to build: its type, full parameters, estimated memory (bytes) and expected recall@10."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)
    memory: int = 0
    recall: float = 1.0
    reason: str = ""

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items() if k != "seed")
        return f"{self.type}" + (f" ({shown})" if shown else "")


def parse_size(text: str) -> int:
    """``"4GB"`` -> 4_000_000_000 bytes. KB/MB/GB/TB (and K/M/G/T) are powers of 1000, KiB/MiB/GiB/TiB of 1024."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)(B?)\s*", text.upper())
    if not m or (m.group(3) and not m.group(2)):
        raise ClipretError(f"cannot read {text!r} as a size; write it like 4GB, 512MB or 2GiB")
    number, unit, binary = float(m.group(1)), m.group(2), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # unreachable


def default_nlist(n: int) -> int:
    """The power of two nearest 4·sqrt(N) cells, halved until each cell has at least 39 training points.

    1000 vectors: 4·sqrt(1000) ≈ 126 -> 128, halved to 16 (1000 // 39 = 25 cells at most); below 78 vectors, 1.
    """
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def default_nprobe(nlist: int) -> int:
    """Cells visited per query: nlist/64, at least ``IVF_MIN_NPROBE`` (and at most nlist)."""
    return min(nlist, max(IVF_MIN_NPROBE, nlist // 64))


def default_pq_m(dim: int) -> int:
    """dim/4 sub-quantizers (64 bytes a vector at D=256, nbits=8), a divisor of dim."""
    return largest_divisor_at_most(dim, max(1, dim // 4))


def largest_divisor_at_most(dim: int, m: int) -> int:
    return max(d for d in range(1, max(1, m) + 1) if dim % d == 0)


def complete_params(kind: str, n: int, dim: int, given: dict[str, Any]) -> dict[str, Any]:
    """Fill the parameters the user did not give with the documented defaults."""
    g = {k: v for k, v in given.items() if v is not None}
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"m": g.get("m", HNSW_M), "ef_construction": g.get("ef_construction", HNSW_EF_CONSTRUCTION),
                "ef_search": g.get("ef_search", HNSW_EF_SEARCH)}
    nlist = g.get("nlist", default_nlist(n))
    params: dict[str, Any] = {"nlist": nlist, "nprobe": min(g.get("nprobe", default_nprobe(nlist)), nlist)}
    if kind == "ivfpq":
        params["m"] = g.get("m", default_pq_m(dim))
        params["nbits"] = g.get("nbits", PQ_NBITS)
    return params


def check_params(kind: str, n: int, dim: int, params: dict[str, Any]) -> None:
    """Raise a one-line :class:`ClipretError` for parameters FAISS would reject."""
    for key, value in params.items():
        if key != "seed" and (not isinstance(value, int) or value < 1):
            raise ClipretError(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    if kind in ("ivf", "ivfpq") and params["nlist"] > n:
        raise ClipretError(f"--nlist {params['nlist']} is more than the {n} vectors to index; use --nlist {default_nlist(n)} or --type flat")
    if kind == "ivfpq":
        if dim % params["m"]:
            raise ClipretError(f"--m {params['m']} must divide the dim {dim}; try --m {default_pq_m(dim)}")
        if params["nbits"] > 16:
            raise ClipretError(f"--nbits must be at most 16, got {params['nbits']}; 8 is usual")
        if n < 2 ** params["nbits"]:
            raise ClipretError(f"ivfpq with --nbits {params['nbits']} needs at least {2 ** params['nbits']} vectors to train; "
                               f"use --nbits {max(1, int(math.log2(max(n, 2))))} or --type flat")


def estimate_memory(kind: str, n: int, dim: int, params: dict[str, Any]) -> int:
    """Bytes the index takes in RAM (about its file size) for ``n`` vectors of ``dim`` floats."""
    if kind == "flat":
        return 4 * dim * n
    if kind == "hnsw":
        m = params["m"]
        # full vectors; level-0 links (2M int32) plus upper levels (~M/(M-1)); offsets (8) and level (4)
        return int(n * (4 * dim + 4 * (2 * m + m / max(m - 1, 1)) + 12))
    quantizer = 4 * dim * params["nlist"]
    if kind == "ivf":
        return n * (4 * dim + 8) + quantizer
    code = math.ceil(params["m"] * params["nbits"] / 8)
    codebooks = 4 * dim * 2 ** params["nbits"]
    return n * (code + 8) + quantizer + codebooks


def expected_recall(kind: str, dim: int, params: dict[str, Any]) -> float:
    """Recall@10 the benchmark measured for this type at default search parameters."""
    if kind != "ivfpq":
        return EXPECTED_RECALL[kind]
    per_dim = params["m"] * params["nbits"] / 8 / dim
    known = sorted(EXPECTED_RECALL_PQ)
    below = [r for r in known if r <= per_dim + 1e-12]
    return EXPECTED_RECALL_PQ[below[-1]] if below else min(EXPECTED_RECALL_PQ.values()) / 2


def plan_index(kind: str, n: int, dim: int, given: dict[str, Any], max_memory: int | None = None) -> IndexPlan:
    """The index to build for ``n`` vectors of ``dim``; ``kind`` is a type or ``"auto"``.

    ``auto`` considers flat below ``AUTO_FLAT_BELOW`` vectors and HNSW and IVF-flat
    at any size, and takes the one with the best expected recall (less memory
    breaks ties). With ``max_memory`` (bytes) only the candidates whose estimated
    memory fits count; when none does, IVF-PQ with the largest code (m, nbits)
    that fits. An explicit type must fit the budget too. Raises
    :class:`ClipretError` (one line) when nothing fits.
    """
    if kind != "auto":
        if kind not in INDEX_TYPES:
            raise ClipretError(f"unknown --type {kind!r}; choose auto, {', '.join(INDEX_TYPES)}")
        if kind == "ivfpq" and max_memory is not None and given.get("m") is None:
            return _fit_pq(n, dim, given, max_memory, only=True)
        plan = _plan(kind, n, dim, given, f"--type {kind}")
        if max_memory is not None and plan.memory > max_memory:
            raise ClipretError(f"{plan.describe()} for {n} vectors needs about {format_size(plan.memory)}, more than "
                               f"--max-memory {format_size(max_memory)}; raise it or use --type auto")
        return plan
    candidates = []
    for pick in auto_candidates(n):
        try:
            candidates.append(_plan(pick, n, dim, given, ""))
        except ClipretError:  # parameters given for another type (--nlist > n, say) rule this one out
            continue
    if max_memory is not None:
        candidates = [p for p in candidates if p.memory <= max_memory]
        if not candidates:
            return _fit_pq(n, dim, given, max_memory, only=False)
    best = max(candidates, key=lambda p: (p.recall, -p.memory))
    if max_memory is not None:
        reason = f"auto: best expected recall within --max-memory {format_size(max_memory)}"
    elif best.type == "flat":
        reason = f"auto: {n} vectors < {AUTO_FLAT_BELOW}"
    else:
        reason = f"auto: {n} vectors >= {AUTO_FLAT_BELOW}, best expected recall of hnsw and ivf"
    return replace(best, reason=reason)


def auto_candidates(n: int) -> list[str]:
    """The types ``auto`` weighs for ``n`` vectors (IVF needs 39 training vectors a cell)."""
    return (["flat"] if n < AUTO_FLAT_BELOW else []) + ["hnsw"] + (["ivf"] if n >= 39 else [])


def _plan(kind: str, n: int, dim: int, given: dict[str, Any], reason: str) -> IndexPlan:
    params = complete_params(kind, n, dim, given)
    check_params(kind, n, dim, params)
    return IndexPlan(kind, params, estimate_memory(kind, n, dim, params), expected_recall(kind, dim, params), reason)


def _fit_pq(n: int, dim: int, given: dict[str, Any], max_memory: int, *, only: bool) -> IndexPlan:
    """IVF-PQ with the largest code that fits: nbits 8 (or the given one), m from dim/2 down; then nbits 4."""
    reason = f"{'--type ivfpq' if only else 'auto'}: largest PQ code within --max-memory {format_size(max_memory)}"
    nbits_options = [given["nbits"]] if given.get("nbits") else [8, 4]
    smallest = None
    for nbits in nbits_options:
        for m in sorted((d for d in range(1, dim // 2 + 1) if dim % d == 0), reverse=True):
            if n < 2 ** nbits or n < 39:
                continue
            params = complete_params("ivfpq", n, dim, {**given, "m": m, "nbits": nbits})
            plan = IndexPlan("ivfpq", params, estimate_memory("ivfpq", n, dim, params), expected_recall("ivfpq", dim, params), reason)
            smallest = plan if smallest is None or plan.memory < smallest.memory else smallest
            if plan.memory <= max_memory:
                check_params("ivfpq", n, dim, params)
                return plan
    need = f"; the smallest index ({smallest.describe()}) needs about {format_size(smallest.memory)}" if smallest else ""
    raise ClipretError(f"no index of {n} vectors of dim {dim} fits --max-memory {format_size(max_memory)}{need}; "
                       "raise --max-memory or index fewer vectors")
