"""Embedding: images -> (N, D) float32 unit rows.

* :mod:`~clipret.embedding.batches`: one process, image files in batches through an encoder;
* :mod:`~clipret.embedding.tta`: test-time augmentation views and their average;
* :mod:`~clipret.embedding.folder`: :func:`~clipret.embedding.folder.embed_folder`, a whole
  folder, resumable, on one process or sharded across torchrun ranks
  (:mod:`~clipret.embedding.sharded`, progress in ``OUT.parts/``: :mod:`~clipret.embedding.parts`).

Nothing is imported here, so ``import clipret.embedding`` stays free of torch.
"""
