"""End-of-epoch validation across ranks: embed the held-out images in shards, score on rank 0.

Each rank embeds one contiguous block of the held-out ids (in id order, with rank 0's
BatchNorm statistics, the ones the exported model has); rank 0 gathers the blocks in rank
order, which is id order, scores leave-one-out retrieval, and hands the scores to every rank,
so every rank takes the same "best epoch" decision. With one process it is a plain embed
and score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clipret import runtime
from clipret.data.decode import decode_side_for
from clipret.data.transforms import eval_transform
from clipret.embedding.batches import embed_images
from clipret.parallel import groups
from clipret.parallel.shards import split_contiguous
from clipret.training.ddp import sync_buffers
from clipret.training.validate import leave_one_out

__all__ = ["nonfinite_warning", "validate_epoch", "validate_start"]


def validate_epoch(state: Any) -> dict[str, float] | None:
    """``{"val_recall@1", "val_map@r"}`` of the model in ``state`` (a TrainState) on its held-out
    images, or ``{"val_nonfinite": n}`` when n of their embeddings are not finite
    (:func:`leave_one_out`); the same dict on every rank; None without held-out images."""
    data, cfg = state.data, state.cfg
    if not len(data.val_idx):
        return None
    val_ids = [data.ids[i] for i in data.val_idx]
    block = split_contiguous(len(val_ids), runtime.world_size(), runtime.rank())
    sync_buffers(state.model)
    vecs, kept, _ = embed_images(state.model, data.folder, val_ids[block.start:block.stop],
                                 eval_transform(state.spec.preprocess), batch_size=state.p * cfg.k,
                                 workers=state.workers, device=state.device, amp=state.amp,
                                 decode_side=decode_side_for(state.spec.preprocess["size"], cfg.exact_decode))
    parts = groups.all_gather_object((vecs, kept))
    scores = None
    if runtime.is_main():
        by_id = dict(zip(data.ids, data.class_of))
        all_kept = [i for _, ids in parts for i in ids]
        scores = leave_one_out(np.concatenate([v for v, _ in parts]), [by_id[i] for i in all_kept])
    return groups.broadcast_object(scores)


def validate_start(state: Any) -> dict[str, Any] | None:
    """Score the starting weights on the held-out images, before any step, and append the row to
    ``state.history``: metrics.jsonl's epoch-0 row (never exported; it is what the pretrained
    weights give before fine-tuning). None without held-out images."""
    scores = validate_epoch(state)
    if scores is None:
        return None
    row = {"epoch": 0, "step": 0, **scores, "best": False}
    state.history.append(row)
    return row


def nonfinite_warning(row: dict[str, Any]) -> str | None:
    """The warning line for a validated row (epoch 0: the starting weights) whose held-out
    embeddings were not finite; None for a scored row."""
    n = row.get("val_nonfinite")
    if not n:
        return None
    if row["epoch"] == 0:
        return (f"the starting weights give {n} non-finite (NaN or inf) held-out embeddings, so they cannot be scored; "
                "check the --pretrained weights")
    return (f"validation of epoch {row['epoch']} failed: {n} held-out embeddings were not finite (NaN or inf), so the "
            "epoch is not scored and not exported; if this goes on, train again with a lower --lr")
