"""One clipret command, timed at two commits side by side, interleaved: does a change make it slower?

The older commit is checked out as a git worktree (``git worktree add /tmp/old REV``) and put first on
``PYTHONPATH`` for its runs; the newer runs use the installed clipret. Runs alternate (new, old,
old, new, ...) so a drift of the machine falls on both sides; each is a whole process. It prints the
median wall time of each side and their ratio (above 1: the newer commit is slower).

    git worktree add -f /tmp/old b692ae0
    python bench/before_after.py --old /tmp/old --rounds 4 -- \
        embed /tmp/clipret-bench/embed/n1000-2000x1500-q90-s0 --model clipret/configs/tiny-vit.json \
        --pretrained none --out /tmp/ba.npy --batch-size 64 --device cpu --overwrite

Time nothing else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _run(args: list[str], pythonpath: str | None) -> float:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "clipret", *args], env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"clipret {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the older commit (a git worktree)")
    ap.add_argument("--rounds", type=int, default=4, help="runs of each side (default 4)")
    ap.add_argument("--json", type=Path, help="also write the times here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the clipret command and its arguments")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the clipret command after --")
    old = str(args.old.resolve())
    times: dict[str, list[float]] = {"new": [], "old": []}
    for i in range(args.rounds):
        for side in (("new", "old") if i % 2 == 0 else ("old", "new")):
            times[side].append(_run(command, old if side == "old" else None))
            print(f"round {i + 1} {side}: {times[side][-1]:.2f} s", flush=True)
    new, prev = statistics.median(times["new"]), statistics.median(times["old"])
    print(f"clipret {command[0]}: old {prev:.2f} s, new {new:.2f} s (medians of {args.rounds}); "
          f"ratio new / old {new / prev:.3f} (above 1: the newer commit is slower)")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "times": times, "ratio_new_over_old": new / prev}))


if __name__ == "__main__":
    main()
