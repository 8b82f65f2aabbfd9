"""Mean ± std over seeds, paired deltas against a baseline row, and a markdown table: pure functions for bench tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

METRICS = ("recall@1", "map@r", "map")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for one value; NaNs for none)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(
    by_seed: Mapping[str, Mapping[int, Mapping[str, float]]],
    baseline: str,
    keys: Sequence[str] = METRICS,
) -> dict[str, dict[str, Any]]:
    """Per row: ``seeds``, ``{key: (mean, std)}`` and ``delta[key] = (mean, std)`` of row − baseline per seed.

    ``by_seed[row][seed][key]`` holds one measurement. Deltas pair the row
    and the baseline seed by seed, over the seeds both have (so a row run
    on fewer seeds is still compared like with like).
    """
    base = by_seed.get(baseline, {})
    out: dict[str, dict[str, Any]] = {}
    for name, seeds in by_seed.items():
        row: dict[str, Any] = {"seeds": sorted(seeds), "delta": {}}
        for key in keys:
            row[key] = mean_std([seeds[s][key] for s in sorted(seeds) if key in seeds[s]])
            paired = [seeds[s][key] - base[s][key] for s in sorted(seeds) if s in base and key in seeds[s] and key in base[s]]
            row["delta"][key] = mean_std(paired)
        out[name] = row
    return out


def fmt_pm(mean_std_pair: tuple[float, float], digits: int = 3, signed: bool = False) -> str:
    """``0.812 ± 0.004`` (``+0.012 ± 0.003`` when ``signed``); ``n/a`` for NaN."""
    mean, std = mean_std_pair
    if math.isnan(mean):
        return "n/a"
    return f"{mean:+.{digits}f} ± {std:.{digits}f}" if signed else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; ``|`` inside cells is escaped."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])
