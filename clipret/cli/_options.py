"""Option types shared by several commands (Annotated, so defaults stay in signatures)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Optional, TypeVar

import typer

from clipret.model.bundled import bundled_names

Model = Annotated[
    str,
    typer.Option("--model", "-m", help="open_clip model name (ViT-L-14), path to an open_clip config JSON, or a config "
                 f"bundled with clipret, by name from any folder ({', '.join(bundled_names())})."),
]
Pretrained = Annotated[
    Optional[str],
    typer.Option(help="Weights: a tag (openai, laion2b_s32b_b82k), a local .safetensors/.pt file, TAG=FILE (a local file "
                 "holding that tag's weights, e.g. openai=/w/ViT-L-14.safetensors), or none.", show_default="the model's usual tag"),
]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Amp = Annotated[str, typer.Option(help="Mixed precision: auto (bf16 on CUDA, none on CPU), bf16, fp16 or none.")]
Workers = Annotated[
    Optional[int],
    typer.Option(help="Data-loading worker processes. Default: the CPUs this process may use (at most 8); 0 for small jobs.", show_default="auto"),
]
BatchSize = Annotated[int, typer.Option(help="Images per forward pass.")]
Seed = Annotated[int, typer.Option(help="Random seed (python, numpy, torch, sampler).")]
TopK = Annotated[int, typer.Option("--k", "-k", help="Neighbours to return per query.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.", show_default="off")]
Tta = Annotated[
    Optional[str],
    typer.Option(
        "--tta",
        help="Test-time augmentation: flip (2 forward passes per image; a bare --tta means flip) or flip,scales (4). "
        "Give the same --tta to the gallery's `embed` and to `query`.",
        show_default="off",
    ),
]


def warn_ignored_pretrained(model: str, pretrained: str | None) -> None:
    """A trained run folder carries its own weights: say so when --pretrained was given too."""
    from pathlib import Path

    if pretrained is not None and Path(model).is_dir():
        from clipret.cli import _console

        _console.warn(f"--pretrained is ignored: {model} is a trained run folder and carries its own weights")


def warn_random_weights(model: str, pretrained: str | None) -> None:
    """Say once (on stderr) that a config JSON with no weights embeds with random weights, unless
    ``--pretrained none`` said so explicitly."""
    from pathlib import Path

    if pretrained is not None or Path(model).is_dir() or not model.endswith(".json"):
        return
    from clipret.model.backbone import default_tag

    if default_tag(Path(model).stem) == "none":
        from clipret.cli import _console

        _console.warn(f"{model} is a model config without weights: the embeddings come from random weights; pass "
                      "--pretrained TAG or FILE for real weights, or --pretrained none to say this is intended")


# Post-processing stages and index search, shared by `query` and `evaluate` (SearchOptions below; see
# clipret.retrieval.pipeline).
Rerank = Annotated[bool, typer.Option("--rerank", help="k-reciprocal re-ranking (Zhong et al. 2017); scores become 1 - final distance.", show_default="off")]
K1 = Annotated[int, typer.Option("--k1", help="Re-ranking: size of the k-reciprocal neighbour lists; about the number of relevant gallery items a query has works best (30 beat 20 with ~200 per class).")]
K2 = Annotated[int, typer.Option("--k2", help="Re-ranking: neighbours averaged by its local query expansion (the item included).")]
Lam = Annotated[float, typer.Option("--lambda", help="Re-ranking: weight of the original distance (0..1); the Jaccard distance gets 1 - lambda. 0.1 beat the paper's 0.3 on every k1/k2 we measured (docs/benchmarks.md).")]
Qe = Annotated[int, typer.Option("--qe", help="Query expansion: average each query with its top-N gallery items, then search again (0: off; a bare --qe means 5).")]
QeAlpha = Annotated[
    Optional[float],
    typer.Option("--qe-alpha", help="alpha-QE (Radenovic et al. 2018): weight each of the --qe neighbours by max(sim, 0)^alpha.", show_default="off: uniform QE"),
]
Dba = Annotated[int, typer.Option("--dba", help="Database-side augmentation: average each gallery vector with its top-N gallery neighbours (0: off).")]
KeepSelf = Annotated[
    bool,
    typer.Option(
        "--keep-self",
        help="Keep a query's own item in its ranking when the query is also in the gallery (near-duplicate "
        "detection). By default it is left out, as the metric-learning benchmarks require.",
        show_default="off",
    ),
]
Nprobe = Annotated[Optional[int], typer.Option("--nprobe", help="IVF index: cells searched per query (overrides the index's own).", show_default="the index's own")]
SearchDevice = Annotated[Optional[str], typer.Option(
    "--search-device", help="Where exact search, QE/DBA and full-ranking scores run: auto (a GPU when torch sees one and the "
    "gallery is large enough), cpu, cuda or cuda:N. Overrides CLIPRET_SEARCH_DEVICE.", show_default="auto")]
EfSearch = Annotated[Optional[int], typer.Option("--ef-search", help="HNSW index: search breadth (overrides the index's own).", show_default="the index's own")]
Decode = Annotated[
    str,
    typer.Option(
        "--decode",
        help="How JPEGs are decoded: auto (on a CUDA device, nvJPEG on the GPU with resizing there, the loader "
        "workers only reading bytes; else PIL in the workers), gpu, or pil. Other formats and files nvJPEG refuses "
        "always go through PIL, and bad files are skipped and reported the same way. Also CLIPRET_GPU_DECODE=0/1.",
        show_default=True,
    ),
]
ExactDecode = Annotated[
    bool,
    typer.Option(
        "--exact-decode",
        help="Decode every JPEG at full size. By default a JPEG much larger than the model input is decoded at a "
        "reduced scale (both sides kept >= 2x the input side), which measured a mean cosine >= 0.99999 to the full "
        "decode at 2-4x less decoding time (docs/benchmarks.md).",
        show_default="off",
    ),
]


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """The post-processing and index-search options of ``query`` and ``evaluate``, declared once
    (:func:`search_options`)."""

    dba: int = 0
    qe: int = 0
    qe_alpha: Optional[float] = None
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lam: float = 0.1
    nprobe: Optional[int] = None
    ef_search: Optional[int] = None
    keep_self: bool = False
    search_device: Optional[str] = None

    def stages(self) -> Any:
        """The pipeline's :class:`~clipret.retrieval.pipeline.Stages` (a one-line ClipretError on bad
        values, ``--search-device`` included)."""
        from clipret.retrieval.pipeline import Stages
        from clipret.retrieval.search import check_search_device

        if self.search_device is not None:
            check_search_device(self.search_device)

        return Stages(dba=self.dba, qe=self.qe, qe_alpha=self.qe_alpha, rerank=self.rerank, k1=self.k1, k2=self.k2,
                      lam=self.lam)


_SEARCH_OPTIONS = {"dba": Dba, "qe": Qe, "qe_alpha": QeAlpha, "rerank": Rerank, "k1": K1, "k2": K2, "lam": Lam,
                   "nprobe": Nprobe, "ef_search": EfSearch, "keep_self": KeepSelf, "search_device": SearchDevice}
F = TypeVar("F", bound=Callable[..., Any])


def search_options(command: F) -> F:
    """Give ``command`` the options of :class:`SearchOptions` where its parameter ``options:
    SearchOptions`` stands (so ``--help`` lists them there); it is called with them gathered
    into that one ``options`` value."""
    signature = inspect.signature(command, eval_str=True)
    params = list(signature.parameters.values())
    at = [p.name for p in params].index("options")
    options = [inspect.Parameter(f.name, params[at].kind, default=f.default, annotation=_SEARCH_OPTIONS[f.name])
               for f in dataclasses.fields(SearchOptions)]
    params[at : at + 1] = options

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        gathered = SearchOptions(**{o.name: kwargs.pop(o.name) for o in options if o.name in kwargs})
        return command(*args, options=gathered, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper  # type: ignore[return-value]
