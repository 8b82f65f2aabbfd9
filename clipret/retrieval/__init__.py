"""Retrieval: arrays in, rankings out. On a machine without an NVIDIA GPU it never imports torch, so
query and evaluate on .npy files start fast; with one, large exact searches and score blocks run as
torch matmuls on it (:func:`~clipret.retrieval.search.search_device`, ``CLIPRET_SEARCH_DEVICE``).

* :mod:`~clipret.retrieval.ranking`: the one tie rule every ranking follows;
* :mod:`~clipret.retrieval.search`: the :class:`~clipret.retrieval.search.Searcher` protocol and
  exact chunked search;
* :mod:`~clipret.retrieval.expansion`: query expansion (QE, α-QE) and DBA;
* :mod:`~clipret.retrieval.rerank`: k-reciprocal re-ranking;
* :mod:`~clipret.retrieval.index`: FAISS indexes (an optional extra);
* :mod:`~clipret.retrieval.pipeline`: the stages in their fixed order; :mod:`~clipret.retrieval.scores`:
  full-gallery score blocks for evaluation;
* :mod:`~clipret.retrieval.gallery`: a gallery (embeddings or an index); :mod:`~clipret.retrieval.prepare`:
  what searching it needs for given stages;
  :mod:`~clipret.retrieval.selfmatch` and :mod:`~clipret.retrieval.compat`: which query is which
  gallery item, and whether two sides can be compared.
"""
