"""``clipret prepare``: turn a dataset's raw files into the folder layout ``clipret train`` reads.

    ROOT/training/<class>/*   ROOT/test/query/<class>/*   ROOT/test/gallery/<class>/*
    ROOT/test/labels.csv      ROOT/prepare.json           ROOT/dataset.csv (--csv)

One module per dataset family (``idx`` Fashion-MNIST, ``cifar``, ``food101``, ``pets``,
``cub``, ``cars``, ``sop``, ``inshop``, ``folder``) builds a :class:`~clipret.prepare.plan.Plan`;
``writer`` writes any plan atomically per file and resumably; ``registry`` maps NAME to its
converter and split policy; ``run.prepare`` ties them together. The metric-learning benchmarks
(cub200, cars196, sop) use their test set as both queries and gallery: ``test/query`` is a
relative link to ``test/gallery``, and clipret's self-match rule leaves each query's own image
out of its ranking. See docs/prepare.md.
"""

from __future__ import annotations

from clipret.prepare.registry import DATASETS, PrepareOptions
from clipret.prepare.run import prepare

__all__ = ["DATASETS", "PrepareOptions", "prepare"]
