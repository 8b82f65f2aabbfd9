"""bench/serve.py in its --quick size, so the load test cannot rot (no timing is asserted: the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytest.importorskip("fastapi")


@pytest.mark.slow
def test_the_serve_bench_runs_small_with_no_errors_and_batches_only_when_on(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ratio micro-batching on / API loop" in r.stdout
    res = json.loads(out.read_text())
    on, off, api = res["rows"]
    for row in (on, off):
        assert row["requests"] == res["settings"]["requests"] == 200 and row["errors"] == 0, row
        assert row["exit_code"] == 0  # SIGTERM: drained, then a clean exit
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert on["mean_batch"] > 1 and off["mean_batch"] == 1 and off["batches"] == 200
    assert res["settings"]["clients"] == 16
    assert api["requests"] >= 200 and api["rps"] > 0
    assert res["ratio_on_over_api"] == pytest.approx(on["rps"] / api["rps"])
