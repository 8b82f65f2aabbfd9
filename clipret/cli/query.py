"""``clipret query QUERY --gallery g.npy|g.faiss``: top-k retrieval, with optional post-processing, into results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

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
from clipret.cli.embed import EmbedBatchSize
from clipret.errors import ClipretError


@_console.handle_errors
@search_options
def query_command(
    gallery: Annotated[Path, typer.Option("--gallery", "-g", help="Gallery: embeddings .npy from `clipret embed`, or an index from `clipret index`.")],
    query: Annotated[Optional[Path], typer.Argument(help="Query embeddings (.npy with its .json manifest), a folder of images, or a dataset CSV (its query rows); omit it with --text.", show_default=False)] = None,
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
    text: Annotated[Optional[list[str]], typer.Option("--text", "-t", help="Search with text (repeat for several queries), through the text tower of the zero-shot CLIP model that embedded --gallery; a fine-tuned gallery is refused.", show_default="none: QUERY is searched")] = None,
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

    --text searches with words instead of images: CLIP's text tower shares the
    space of its own image tower, so it needs a gallery that the same zero-shot
    model embedded (`clipret embed DIR --model ViT-B-32 --pretrained TAG`);
    a fine-tuned run's gallery has no text tower in its space.

    Examples:

    \b
      clipret query ./data/test/query --model runs/exp1 --gallery gallery.npy --k 10 --out results.json
      clipret query ./data/test/query --model runs/exp1 --gallery gallery.npy --tta flip --rerank --qe 3
      clipret query q.npy --gallery gallery.faiss --nprobe 32 --k 100
      clipret query --text "a red dress" --gallery g0.npy --model ViT-B-32 --pretrained openai --k 5
    """
    import dataclasses

    from clipret import artifacts, runtime
    from clipret.api import retrieve
    from clipret.data.dataset_csv import is_dataset_csv
    from clipret.data.sources import check_source
    from clipret.retrieval.gallery import open_gallery

    if k <= 0:
        _console.fail(f"--k must be positive, got {k}")
    if (query is None) == (text is None):
        _console.fail("give a query (a folder of images or a .npy) or --text \"words\", one of the two")
    if query is not None and not query.exists():
        raise ClipretError(f"query path not found: {query}")
    options.stages()  # a bad value fails before any image is read
    images = query is not None and (query.is_dir() or is_dataset_csv(query))  # else a .npy of embeddings
    if images:
        check_source(query)  # a dataset CSV's every row, before a model loads
    if not runtime.is_main() and not images:
        return  # under torchrun, rank 0 alone searches: only a query folder has work for the other ranks
    gal = open_gallery(gallery, nprobe=options.nprobe, ef_search=options.ef_search) if runtime.is_main() else None
    if text is not None:
        if tta is not None:
            _console.fail("--tta applies when images are embedded; a text query has none")
        q = _text_queries(text, gallery, gal, model, pretrained, device=device, amp=amp, allow_mismatch=allow_mismatch)
    elif images:
        model, pretrained, tta = _gallery_defaults(gallery, model, pretrained, tta)
        if runtime.is_main():
            warn_ignored_pretrained(model, pretrained)
            warn_random_weights(model, pretrained)
        from clipret.cli.embed import rank_stage_progress
        from clipret.embedding.encoder import Encoder
        from clipret.parallel.groups import PeerError

        try:  # under torchrun every rank embeds its share of the queries; rank 0 gets them all
            with rank_stage_progress("embed queries") as progress:
                q = Encoder.load(model, pretrained, device=device, amp=amp).embed_folder(
                    query, tta=tta, progress=progress, batch_size=batch_size, workers=workers, strict=strict,
                    exact_decode=exact_decode, rows="query" if is_dataset_csv(query) else None)
        except PeerError:  # another rank failed and printed why
            _console.leave_group(2)
        if not runtime.is_main():
            return
        _console.report_unreadable(q.skipped)
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


def _text_queries(texts: list[str], gallery: Path, gal: Any, model: str | None, pretrained: str | None, *,
                  device: str, amp: str, allow_mismatch: bool) -> Any:
    """Embeddings of ``texts`` by the text tower of the zero-shot model that embedded ``gallery`` (--model, else
    the one its manifest records); a fine-tuned gallery is refused in one line that says what to do."""
    from clipret.embedding.text import TextEncoder, fine_tuned_refusal, is_fine_tuned

    if model is None:
        if is_fine_tuned(gal.flags) or not gal.flags.get("model"):
            raise ClipretError(fine_tuned_refusal(gallery, gal.root, gal.flags) if is_fine_tuned(gal.flags) else
                               f"{gallery} does not record the model that embedded it; pass --model and --pretrained")
        model, pretrained = str(gal.flags["model"]), pretrained or gal.flags.get("pretrained")
        _console.info(f"using the gallery's --model {model} --pretrained {pretrained} (as recorded in {gallery}'s manifest)")
    encoder = TextEncoder.load(model, pretrained, device=device, amp=amp)
    for note in encoder.check_gallery(gal, allow_mismatch=allow_mismatch):
        _console.warn(note)
    q = encoder.embed_text(texts)
    q.flags["tta"] = gal.flags.get("tta")  # TTA is an image-side setting: a text query has none to match
    return q


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
