"""FAISS indexes: choose one, build it, add to it and remove from it, load, validate and search it.

This package is the one entry point the rest of clipret uses:

* :mod:`~clipret.retrieval.index.choice`: which index type and parameters (pure, no faiss);
* :mod:`~clipret.retrieval.index.source`: the embeddings files an index is built from;
* :mod:`~clipret.retrieval.index.build`: build, ``--add``, ``--remove``, ``--info``;
* :mod:`~clipret.retrieval.index.store`: open an index pair and search it; exact search
  through FAISS's kernel;
* :mod:`~clipret.retrieval.index._faiss`: the one place that imports faiss (an optional extra).

faiss itself is imported only inside the functions that need it.
"""

from clipret.retrieval.index._faiss import have_faiss, import_faiss, set_threads
from clipret.retrieval.index.build import add_to_index, build_index, index_info, remove_from_index
from clipret.retrieval.index.choice import IndexPlan, format_size, parse_size, plan_index
from clipret.retrieval.index.store import (
    FaissExactSearcher,
    IndexGallery,
    IndexSearcher,
    exact_searcher,
    is_index_path,
    open_index,
)

__all__ = [
    "FaissExactSearcher",
    "IndexGallery",
    "IndexPlan",
    "IndexSearcher",
    "add_to_index",
    "build_index",
    "exact_searcher",
    "format_size",
    "have_faiss",
    "import_faiss",
    "index_info",
    "is_index_path",
    "open_index",
    "parse_size",
    "plan_index",
    "remove_from_index",
    "set_threads",
]
