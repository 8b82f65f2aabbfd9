"""``clipret serve`` under load: latency and throughput with micro-batching on and off, next to the Python API.

It writes a gallery of seeded random unit vectors (100k by default) in the space of a tiny
random-init model, then, in one run:

1. **API loop**: the in-process Python API, batch 32: decode 32 JPEGs, ``Encoder.embed`` them,
   ``clipret.retrieve`` over the gallery, in a loop (images per second);
2. **server, micro-batching on** (``--max-batch 64 --max-wait-ms 5``) and **off** (``--max-batch 1``):
   ``clipret serve`` on loopback, in its own process; 32 concurrent clients upload the same JPEGs
   (multipart) until 2,000 requests are answered or 60 s have passed, whichever comes first; then
   the server gets SIGTERM and must exit 0.

It prints p50/p95/p99 latency, requests per second, errors, and the ratios; the goal is
micro-batched throughput >= 0.7 x the API loop, with zero errors. Every answer is checked
(k ids, k finite scores, best first).

    flock /tmp/clipret-bench.lock python bench/serve.py --device cpu
    python bench/serve.py --quick            # the small version the tests run
    python bench/serve.py --device cuda --model ViT-B-32   # random weights: timing only

The numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipret.artifacts import write_json

GOAL = 0.7  # micro-batched server throughput / in-process API loop throughput


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def query_jpegs(n: int, size: int) -> list[bytes]:
    """``n`` distinct photo-like JPEGs of ``size`` x ``size`` pixels."""
    from embed import make_photo

    out = []
    for i in range(n):
        buf = io.BytesIO()
        make_photo(i, seed=7, width=size, height=size).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_gallery(path: Path, model: str, count: int, device: str) -> Any:
    """A ``count``-row gallery of seeded unit vectors carrying ``model``'s fingerprint and flags; returns the Encoder."""
    import clipret
    from PIL import Image

    enc = clipret.Encoder.load(model, "none", device=device)
    probe = enc.embed([Image.new("RGB", (32, 32))])  # the fingerprint and flags a real embed would record
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, enc.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    clipret.Embeddings(vectors, [f"item/{i:07d}.jpg" for i in range(count)], fingerprint=probe.fingerprint,
                       flags=probe.flags).save(path)
    return enc


def api_loop(enc: Any, gallery_path: Path, jpegs: list[bytes], k: int, batch: int, count: int, seconds: float) -> dict[str, Any]:
    """Images per second through decode -> ``Encoder.embed`` -> ``clipret.retrieve``, ``batch`` at a time."""
    import clipret
    from PIL import Image

    gallery = clipret.Gallery.open(gallery_path)
    done, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while done < count and time.perf_counter() - start < seconds:
        images = [Image.open(io.BytesIO(jpegs[(done + i) % len(jpegs)])).convert("RGB") for i in range(batch)]
        res = clipret.retrieve(enc.embed(images, batch_size=batch), gallery, k=k)
        assert len(res.ids) == batch and all(len(row) == k for row in res.ids)
        done += batch
    elapsed = time.perf_counter() - start
    return {"mode": f"API loop, batch {batch}", "requests": done, "errors": 0, "seconds": elapsed, "rps": done / elapsed,
            "server_cpu_ms": 1000 * (time.process_time() - cpu0) / max(done, 1)}


def start_server(gallery_path: Path, model: str, port: int, device: str, max_batch: int, max_wait_ms: float) -> subprocess.Popen:
    args = [sys.executable, "-m", "clipret", "serve", "--gallery", str(gallery_path), "--model", model, "--pretrained", "none",
            "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--no-access-log",
            "--device", device]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")


def well_formed(answer: Any, k: int) -> bool:
    """k ids and k finite scores, best first."""
    if not isinstance(answer, dict):
        return False
    ids, scores = answer.get("ids"), answer.get("scores")
    if not isinstance(ids, list) or not isinstance(scores, list) or len(ids) != k or len(scores) != k:
        return False
    return all(np.isfinite(scores)) and all(a >= b for a, b in zip(scores, scores[1:]))


def multipart_request(host: str, port: int, jpeg: bytes, k: int) -> bytes:
    """One complete ``POST /search`` (multipart: ``image``, ``k``) as HTTP/1.1 keep-alive bytes."""
    boundary = b"clipretbench7f3a"
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="k"\r\n\r\n' + str(k).encode() + b"\r\n"
            + b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            + b"Content-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n--" + boundary + b"--\r\n")
    head = (f"POST /search HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response: Content-Length or chunked."""
    status = int((await reader.readline()).split(b" ", 2)[1])
    length, chunked = None, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length or 0)
    body = b""
    while (size := int((await reader.readline()).split(b";")[0], 16)):
        body += await reader.readexactly(size)
        await reader.readline()
    await reader.readline()
    return status, body


async def load(host: str, port: int, jpegs: list[bytes], k: int, clients: int, count: int, seconds: float) -> dict[str, Any]:
    """``clients`` concurrent keep-alive uploaders until ``count`` requests or ``seconds``; latencies and errors.

    The load generator shares the machine with the server, so it is kept cheap: each request is
    prebuilt bytes on a raw asyncio connection (an httpx client spent about as much CPU per
    request as the server did on 2 cores). Every answer is still parsed and checked."""
    requests = [multipart_request(host, port, j, k) for j in jpegs]
    latencies: list[float] = []
    errors: list[str] = []
    issued = [0]
    start = time.perf_counter()

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while issued[0] < count and time.perf_counter() - start < seconds:
                n = issued[0]
                issued[0] += 1
                t0 = time.perf_counter()
                try:
                    writer.write(requests[n % len(requests)])
                    await writer.drain()
                    status, body = await read_response(reader)
                    if status != 200 or not well_formed(json.loads(body), k):
                        errors.append(f"{status}: {body[:200]!r}")
                except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                    errors.append(repr(exc))
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": len(errors), "first_errors": errors[:3], "seconds": elapsed,
            "rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "client_cpu_ms": 1000 * (time.process_time() - cpu0) / max(len(latencies), 1)}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def batch_sizes(url: str) -> dict[str, float]:
    """The server's micro-batch histogram: batches and mean queries per batch (from /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if family.name == "clipret_batch_size":
            vals = {s.name: s.value for s in family.samples if s.name.endswith(("_count", "_sum"))}
            count = vals.get("clipret_batch_size_count", 0.0)
            return {"batches": count, "mean_batch": vals.get("clipret_batch_size_sum", 0.0) / max(count, 1.0)}
    return {"batches": 0.0, "mean_batch": 0.0}


def run_server(mode: str, args: argparse.Namespace, gallery_path: Path, jpegs: list[bytes], max_batch: int) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(gallery_path, args.model, port, args.device, max_batch, args.max_wait_ms)
    try:
        wait_ready(proc, url, timeout=180)
        cpu0 = process_cpu_seconds(proc.pid)
        row = asyncio.run(load("127.0.0.1", port, jpegs, args.k, args.clients, args.requests, args.seconds))
        row["server_cpu_ms"] = 1000 * (process_cpu_seconds(proc.pid) - cpu0) / max(row["requests"], 1)
        row.update(batch_sizes(url))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    row.update(mode=mode, exit_code=code)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Small: 5k gallery, 200 requests, 16 clients (what the test runs).")
    p.add_argument("--gallery-size", type=int, default=None, help="Default 100000 (5000 with --quick).")
    p.add_argument("--requests", type=int, default=None, help="Requests per server run, default 2000 (200 with --quick); "
                   "it stops earlier at --seconds.")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--clients", type=int, default=None, help="Concurrent clients, default 32 (16 with --quick).")
    p.add_argument("--batch", type=int, default=32, help="The API loop's batch.")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--image-size", type=int, default=128, help="Side of the query JPEGs, in pixels.")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--model", default="tiny-vit", help="A model config or name (random weights: timing only).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = p.parse_args()
    full = {"gallery_size": 100_000, "requests": 2000, "clients": 32}
    quick = {"gallery_size": 5000, "requests": 200, "clients": 16}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    jpegs = query_jpegs(16, args.image_size)
    with tempfile.TemporaryDirectory(prefix="clipret-serve-bench-") as tmp:
        gallery_path = Path(tmp) / "gallery.npy"
        enc = write_gallery(gallery_path, args.model, args.gallery_size, args.device)
        api = api_loop(enc, gallery_path, jpegs, args.k, args.batch, args.requests, args.seconds)
        rows = [run_server("server, micro-batching on", args, gallery_path, jpegs, 64),
                run_server("server, micro-batching off", args, gallery_path, jpegs, 1)]
    print(f"gallery {args.gallery_size} x {enc.dim}, model {args.model} on {args.device}, {args.clients} clients, "
          f"<= {args.requests} requests or {args.seconds:.0f} s per run, k={args.k}, {os.cpu_count()} CPUs")
    print(f"{'mode':<30} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'mean batch':>10} "
          f"{'CPU ms/req':>10} {'client CPU ms/req':>17}")
    nan = float("nan")
    for row in [*rows, api]:
        print(f"{row['mode']:<30} {row['requests']:>8} {row['errors']:>6} {row.get('p50_ms', nan):>8.1f} "
              f"{row.get('p95_ms', nan):>8.1f} {row.get('p99_ms', nan):>8.1f} {row['rps']:>8.1f} "
              f"{row.get('mean_batch', nan):>10.1f} {row.get('server_cpu_ms', nan):>10.2f} {row.get('client_cpu_ms', nan):>17.2f}")
    print("CPU ms/req: CPU time of the server process (of this process for the API loop) per request; the clients share "
          "the machine with the server")
    on, off = rows
    ratio = on["rps"] / api["rps"]
    print(f"ratio micro-batching on / API loop: {ratio:.2f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})")
    print(f"ratio micro-batching on / off: {on['rps'] / off['rps']:.2f}")
    for row in rows:
        if row["errors"]:
            print(f"errors in '{row['mode']}': {row['first_errors']}")
        if row["exit_code"] != 0:
            print(f"'{row['mode']}': the server exited with {row['exit_code']} after SIGTERM (expected 0)")
    if args.json is not None:
        write_json(args.json, {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "rows": [*rows, api], "ratio_on_over_api": ratio, "ratio_on_over_off": on["rps"] / off["rps"]})


if __name__ == "__main__":
    main()
