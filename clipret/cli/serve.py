"""``clipret serve --gallery g.npy --model RUN``: an HTTP search service with a web page (see docs/serve.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import Amp, Device, Pretrained


@_console.handle_errors
def serve_command(
    gallery: Annotated[Path, typer.Option("--gallery", "-g", help="The gallery to search: embeddings .npy from `clipret embed`, or an index .faiss from `clipret index`.")],
    model: Annotated[str, typer.Option("--model", "-m", help="The model that embedded --gallery (a run folder, an open_clip name or config JSON); loaded once, it embeds uploaded images.")],
    pretrained: Pretrained = None,
    text_gallery: Annotated[Optional[Path], typer.Option("--text-gallery", help="A gallery embedded by a zero-shot CLIP model (--text-model), which text queries search; needed when --model is a fine-tuned run.", show_default="--gallery, when --model is a zero-shot CLIP model")] = None,
    text_model: Annotated[Optional[str], typer.Option("--text-model", help="The zero-shot CLIP model (open_clip name or config) whose text tower embeds text queries; it must have embedded --text-gallery (with --pretrained).", show_default="--model, when it is not a run folder")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind. Anything but loopback (127.0.0.1, ::1, localhost) needs --token-env.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on.")] = 8000,
    k: Annotated[int, typer.Option("--k", "-k", help="Results per query when a request does not ask for its own k.")] = 10,
    token_env: Annotated[Optional[str], typer.Option("--token-env", help="Name of an environment variable holding a secret token; every request but /, /healthz, /readyz and /docs must then send 'Authorization: Bearer TOKEN' (else 401).", show_default="no token (loopback only)")] = None,
    max_upload: Annotated[str, typer.Option("--max-upload", help="Largest request body (an upload, or JSON with base64 images); larger gets 413.")] = "10MB",
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most queries per micro-batch (one forward pass); 1 turns micro-batching off.")] = 64,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="Longest a micro-batch waits for more queries after its first, in milliseconds.")] = 5.0,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log one line per request (uvicorn's access log).")] = True,
    device: Device = "auto",
    amp: Amp = "auto",
) -> None:
    """Serve image and text search over a gallery, over HTTP, with a web page.

    Endpoints: POST /search (a multipart image upload, or JSON with a base64
    image, a vector, a gallery id or text; options k, qe, rerank, tta),
    POST /search/batch, GET /healthz, GET /readyz, GET /metrics (Prometheus),
    GET /items/{id}/thumbnail, GET / (the web page) and GET /docs (OpenAPI).

    The model is loaded once; concurrent requests are micro-batched: gathered
    for at most --max-wait-ms, up to --max-batch, through one forward pass.

    It binds 127.0.0.1 by default, reachable from this machine only. Binding
    another address needs a token: --token-env NAME names the environment
    variable holding it, and requests without 'Authorization: Bearer TOKEN'
    get 401. Put TLS in front with a reverse proxy (docs/serve.md).

    Text queries need a gallery embedded by a zero-shot CLIP model: a
    fine-tuned run's space has no text tower. Embed one as well and pass it
    with --text-gallery and --text-model. SIGTERM finishes the requests in
    flight, then exits 0.

    Examples:

    \b
      clipret serve --gallery gallery.npy --model runs/exp1
      clipret serve --gallery gallery.faiss --model runs/exp1 --text-gallery g0.npy --text-model ViT-B-32 --pretrained openai
      CLIPRET_TOKEN=s3cret clipret serve --gallery g0.npy --model ViT-B-32 --pretrained openai --host 0.0.0.0 --token-env CLIPRET_TOKEN
    """
    import os
    import signal

    from clipret.errors import ClipretError
    from clipret.serve.settings import Settings, parse_size

    token = None
    if token_env is not None:
        token = os.environ.get(token_env, "")
        if not token.strip():
            raise ClipretError(f"--token-env {token_env}: the environment variable {token_env} is not set or empty; "
                               "set it to a secret token")
    settings = Settings(gallery=gallery, model=model, pretrained=pretrained, text_gallery=text_gallery, text_model=text_model,
                        host=host, port=port, k=k, token=token, max_upload=parse_size(max_upload), max_batch=max_batch,
                        max_wait_ms=max_wait_ms, device=device, amp=amp)
    settings.check()  # a public bind without a token fails before anything loads
    try:
        import uvicorn

        from clipret.serve.app import create_app
        from clipret.serve.service import SearchService
    except ImportError as exc:
        raise ClipretError(f"clipret serve needs its extra ({exc.name} is missing): pip install 'clipret[serve]'") from None

    _console.info(f"loading {model} and {gallery} ...")
    service = SearchService.load(settings)
    text = "text queries on" if service.text is not None else f"text queries off ({service.text_refusal})"
    _console.info(f"serving {len(service.gallery)} items on http://{host}:{port}/ ({text})")
    # uvicorn drains in-flight requests on SIGTERM, then raises the signal again for the handler it found:
    # this one records it, so a drained shutdown exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(create_app(settings, service), host=host, port=port, log_level="info", access_log=access_log,
                timeout_graceful_shutdown=30)
