"""Helpers shared by the ``clipret serve`` tests: tiny galleries, a tiny "fine-tuned" run, and a real
uvicorn server on a free loopback port that stops by itself."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import TINY_VIT

ZERO_SHOT = str(TINY_VIT)  # a bundled config with a text tower; random weights (--pretrained none)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zero_shot_gallery(folder: Path, out: Path) -> Any:
    """Embed ``folder`` with the zero-shot tiny ViT (random weights) into ``out``; return the Embeddings."""
    import clipret

    return clipret.Encoder.load(ZERO_SHOT, "none", device="cpu").embed_folder(folder, out=out, workers=0)


def fine_tuned_run(out: Path) -> Path:
    """A run folder as `clipret train` writes one (config.json + model.safetensors), with a random GeM head."""
    from clipret.model.build import build_encoder, make_spec, save_model

    spec = make_spec("tiny-rn", "none", pool="gem", embed_dim=32)
    save_model(out, build_encoder(spec), spec)
    return out


@contextlib.contextmanager
def live_server(app: Any, timeout: float = 60) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread; yield its base URL; stop it on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def wait_ready(client: Any, url: str = "/readyz", timeout: float = 60) -> Any:
    """Poll ``url`` until it answers 200 (the model and gallery are loaded); return that response."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(url)
        if r.status_code == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)
