"""``clipret query QUERY --gallery g.npy|g.faiss``: top-k retrieval, with optional post-processing, into results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from clipret.cli import _console
from clipret.cli._options import (
    Amp,
    Device,
    ExactDecode,
    Pretrained,
    SearchOptions,
    TopK,
    Tta,
    Workers,
    search_options,
    warn_ignored_pretrained,
    warn_random_weights,
)
from clipret.cli._search import report_self_matches
from clipret.cli.embed import EmbedBatchSize, progress_start, rank_progress
from clipret.errors import ClipretError


@_console.handle_errors
@search_options
def query_command(
    query: Annotated[Path, typer.Argument(help="Query embeddings (.npy with its .json manifest) or a folder of images.")],
    gallery: Annotated[Path, typer.Option("--gallery", "-g", help="Gallery: embeddings .npy from `clipret embed`, or an index from `clipret index`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="results.json to write (and its sidecar results.json.json).")] = Path("results.json"),
    k: TopK = 10,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model to embed a query folder with (as for `clipret embed`); not used for .npy queries.", show_default="the model the gallery's manifest records")] = None,
    pretrained: Pretrained = None,
    allow_mismatch: Annotated[bool, typer.Option(help="Allow query and gallery from different model fingerprints (warns).")] = False,
    tta: Tta = None,
    exact_decode: ExactDecode = False,
    options: SearchOptions = SearchOptions(),  # --dba ... --keep-self (see search_options)
    batch_size: EmbedBatchSize = None,
    workers: Workers = None,
    device: Device = "auto",
    amp: Amp = "auto",
    strict: Annotated[bool, typer.Option(help="Fail if any query image cannot be read.")] = False,
) -> None:
    """Retrieve the top-k gallery items for each query.

    Writes a list of {"filename": query_id, "samples": [gallery ids, best first],
    "scores": [...]}, higher is better: the cosine similarity, or 1 - the final
    distance after --rerank. Beside it, results.json.json records the query, the
    gallery, the stages and their parameters (so `clipret evaluate results.json`
    knows the gallery).

    Post-processing runs in a fixed order: --tta (when images are embedded) ->
    --dba (gallery) -> --qe/--qe-alpha (queries) -> search -> --rerank.

    A query that is also in the gallery (the same source file, or the same
    row when query and gallery are one embeddings file) never lists itself:
    its own item is left out (counted in the sidecar); --keep-self keeps it.

    Examples:

    \b
      clipret query ./data/test/query --model runs/exp1 --gallery gallery.npy --k 10 --out results.json
      clipret query ./data/test/query --model runs/exp1 --gallery gallery.npy --tta flip --rerank --qe 3
      clipret query q.npy --gallery gallery.faiss --nprobe 32 --k 100
    """
    import dataclasses

    from clipret import artifacts, runtime
    from clipret.api import retrieve
    from clipret.retrieval.gallery import open_gallery

    if k <= 0:
        _console.fail(f"--k must be positive, got {k}")
    if not query.exists():
        raise ClipretError(f"query path not found: {query}")
    options.stages()  # a bad value fails before any image is read
    if not runtime.is_main() and not query.is_dir():
        return  # under torchrun, rank 0 alone searches: only a query folder has work for the other ranks
    gal = open_gallery(gallery, nprobe=options.nprobe, ef_search=options.ef_search) if runtime.is_main() else None
    if query.is_dir():
        model, pretrained, tta = _gallery_defaults(gallery, model, pretrained, tta)
        if runtime.is_main():
            warn_ignored_pretrained(model, pretrained)
            warn_random_weights(model, pretrained)
        from clipret.embedding.folder import embed_folder
        from clipret.parallel.groups import PeerError

        try:  # under torchrun every rank embeds its share of the queries; rank 0 gets them all
            with rank_progress("embed queries") as advance:
                q = embed_folder(query, model, pretrained, batch_size=batch_size, workers=workers, device=device, amp=amp, strict=strict,
                                 tta=tta, exact_decode=exact_decode, on_start=lambda n: progress_start(advance, n), on_batch=advance)
        except PeerError:  # another rank failed and printed why
            _console.leave_group(2)
        if not runtime.is_main():
            return
        _console.report_unreadable(q.skipped)
        q.root = query.resolve()
    else:
        if tta is not None:
            _console.fail(f"--tta applies when images are embedded, and {query} holds embeddings already; "
                          "pass --tta to the `clipret embed` that makes the query .npy (and the gallery's)")
        for name, value in (("--model", model), ("--pretrained", pretrained)):
            if value is not None:
                _console.warn(f"{name} is ignored: the queries in {query} are embeddings already")
        q = artifacts.load_embeddings(query)
    notes: list[str] = []
    with _console.stage_progress() as on_progress:
        res = retrieve(q, gal, k, **dataclasses.asdict(options), allow_mismatch=allow_mismatch, progress=on_progress,
                       warnings=notes)
    for note in notes:
        _console.warn(note)
    res.to_json(out)
    report_self_matches(res.self_rows, options.keep_self)
    _console.info(f"wrote top-{min(k, len(gal))} results for {len(q)} queries to {out}")


def _gallery_defaults(gallery: Path, model: str | None, pretrained: str | None,
                      tta: str | None) -> tuple[str, str | None, str | None]:
    """--model, --pretrained and --tta for a query folder: as given, else as the gallery's manifest records them."""
    from clipret import runtime
    from clipret.retrieval.gallery import read_gallery_flags

    flags = read_gallery_flags(gallery)
    said = []
    if model is None:
        recorded = flags.get("model")
        if not recorded:
            _console.fail(f"a query folder needs --model: {gallery} does not record the model it was embedded with")
        looks_like_path = "/" in recorded or "\\" in recorded or recorded.endswith(".json")
        if looks_like_path and not Path(recorded).exists():
            _console.fail(f"{gallery} was embedded with --model {recorded}, which is not found from here; pass --model")
        model, said = recorded, [f"--model {recorded}"]
        if pretrained is None and not Path(recorded).is_dir() and flags.get("pretrained"):
            pretrained = str(flags["pretrained"])
            said.append(f"--pretrained {pretrained}")
    if tta is None and flags.get("tta"):
        tta = str(flags["tta"])
        said.append(f"--tta {tta}")
    if said and runtime.is_main():
        _console.info(f"using the gallery's {' '.join(said)} (as recorded in {gallery}'s manifest)")
    return model, pretrained, tta
