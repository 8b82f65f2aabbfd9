"""Exact ranks of the relevant items for a whole (n, G) block of scores, as torch ops on its device.

The GPU counterpart of :class:`~clipret.evaluation.ranks.RankCounter`, with the same
ranking rule (higher score first, equal scores keep the lower gallery index first), in
counting form: the 0-based rank of gallery item ``j`` in its row is

    #{i : s_i > s_j} + #{i < j : s_i == s_j}

On a GPU a score block never travels to the host: only the ranks do (a few bytes per
relevant item), and every step is a whole-block kernel rather than a loop over rows.

1. The relevant items' scores of each row are sorted ascending: thresholds ``t`` (n, Rmax),
   padded with +inf.
2. ``searchsorted`` gives each gallery item the count of thresholds strictly below its score;
   one ``bincount`` of those counts, summed from the top, is the number of items strictly
   above each threshold (item i is above ``t[r]`` exactly when more than ``r`` thresholds
   are below it).
3. Items whose score equals a threshold (the relevant items themselves, and any exact tie)
   are few; sorted by (row, score, index), an item's place in its run of equal scores is the
   tie term.

A block is counted in slices of rows (:data:`SLICE_ITEMS` scores, and :data:`SLICE_SLOTS`
relevant items, at most), so the extra device memory stays near 17 bytes per score of a slice
(counts, the tie test) plus ~40 bytes per relevant item, whatever the block's size, the classes'
sizes or the number of ties.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["DeviceMembers", "SLICE_ITEMS", "SLICE_SLOTS", "block_rank_parts", "block_ranks"]

SLICE_ITEMS = 1 << 25  # scores counted at once (rows x G)
SLICE_SLOTS = 1 << 23  # relevant items counted at once (rows x the largest R among them)
# Items scored below every relevant item of their row all land in that row's bin 0, which no rank
# reads; with HOT_BIN_SPREAD > 0 they go to that many shared spare bins instead (by column), so the
# histogram's atomic adds do not queue on one address per row. Off until a GPU measures it
# (bench/evaluate.py times both in its device split); the ranks are the same either way.
HOT_BIN_SPREAD = 0


class DeviceMembers:
    """Gallery indices of each label code, ascending, on a torch device.

    codes: (G,) int64 label codes >= 0. ``order`` (G,) int64 holds the gallery indices grouped by
    code; code c's members are ``order[starts[c]:starts[c + 1]]``.
    """

    def __init__(self, codes: np.ndarray, device: Any) -> None:
        import torch

        codes = np.asarray(codes, dtype=np.int64)
        starts = np.zeros(int(codes.max()) + 2, dtype=np.int64)
        np.cumsum(np.bincount(codes, minlength=starts.size - 1), out=starts[1:])
        self.n_codes = starts.size - 1
        self.n_gallery = codes.size
        self.sizes = np.diff(starts)  # (n_codes,) members of each code, on the host
        self.order = torch.as_tensor(np.argsort(codes, kind="stable").astype(np.int64), device=device)
        self.starts = torch.as_tensor(starts, device=device)


def block_rank_parts(block: Any, codes: np.ndarray, members: DeviceMembers, own: np.ndarray | None = None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Ranks of every query's relevant items in one score block, counted on the block's device,
    one slice of rows at a time.

    block: (n, G) float32 torch tensor, higher is better; the scores of a query with relevant items
    must be finite (-inf allowed for items that are not relevant); the query's own item (``own``) is
    overwritten with -inf. codes: (n,) int64 label codes of the queries (a code no gallery item has
    means no relevant item). own: (n,) int64 gallery row of each query's own item, or -1
    (:mod:`clipret.retrieval.selfmatch`): it is left out of the ranking and of R.

    Yields ``(ranks, n_relevant)`` per slice of consecutive queries, in order: ranks (sum R,) int64,
    the 1-based ranks of each query's relevant items, ascending within a query; n_relevant (rows,)
    int64. Equal to :class:`~clipret.evaluation.ranks.RankCounter`'s ranks, sorted, plus one.
    """
    import torch

    n, g = block.shape
    if g != members.n_gallery:
        raise ValueError(f"a score block must have {members.n_gallery} columns, got {g}")
    codes = np.asarray(codes, dtype=np.int64)
    known = (codes >= 0) & (codes < members.n_codes)
    r_max = int(members.sizes[codes[known]].max(initial=0))
    step = max(1, min(SLICE_ITEMS // g, SLICE_SLOTS // max(1, r_max)))
    with torch.inference_mode():  # the score functions make their blocks in inference mode
        for r0 in range(0, n, step):
            yield _block_ranks(block[r0 : r0 + step], codes[r0 : r0 + step], members,
                               None if own is None else own[r0 : r0 + step])


def block_ranks(block: Any, codes: np.ndarray, members: DeviceMembers, own: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`block_rank_parts` joined: ``(ranks (sum R,), n_relevant (n,))`` for the whole block."""
    parts = list(block_rank_parts(block, codes, members, own))
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _block_ranks(block: Any, codes: np.ndarray, members: DeviceMembers, own: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    import torch

    n, g = block.shape
    dev = block.device
    code = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=dev)
    known = (code >= 0) & (code < members.n_codes)
    code = code.clamp(0, members.n_codes - 1)
    first = members.starts[code]
    count = torch.where(known, members.starts[code + 1] - first, torch.zeros_like(first))
    rmax = int(count.max()) if n else 0
    if rmax == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(n, dtype=np.int64)
    slot = torch.arange(rmax, device=dev)
    valid = slot[None, :] < count[:, None]  # (n, rmax)
    rel = members.order[(first[:, None] + slot[None, :]).clamp(max=g - 1)]
    if own is not None:
        own_t = torch.as_tensor(np.asarray(own, dtype=np.int64), device=dev)
        rows = torch.nonzero(own_t >= 0).squeeze(1)
        block[rows, own_t[rows]] = -torch.inf
        valid &= rel != own_t[:, None]
    n_valid = valid.sum(dim=1)
    if int(n_valid.sum()) == 0:
        return np.zeros(0, dtype=np.int64), n_valid.cpu().numpy()
    thresholds = block.gather(1, rel)
    top = block.amax(dim=1)  # NaN when a row holds one; +inf never ranks
    bad = (torch.isnan(top) | (top == torch.inf)) & (n_valid > 0)  # rows without relevant items are not ranked
    if bool(bad.any()) or not bool(torch.isfinite(thresholds[valid]).all()):
        raise ValueError("scores must be finite")
    thresholds.masked_fill_(~valid, torch.inf)
    thresholds, perm = thresholds.sort(dim=1)  # ascending; left-out slots (+inf) last
    rel = rel.gather(1, perm)
    valid = slot[None, :] < n_valid[:, None]

    wide = n * (rmax + 1) + HOT_BIN_SPREAD >= 2**31  # bincount slots that int32 cannot number
    below = torch.searchsorted(thresholds, block, side="left", out_int32=not wide)  # (n, G): thresholds < s_i
    tied = thresholds.gather(1, below.clamp(max=rmax - 1).long()) == block  # s_i equals some threshold
    bins = n * (rmax + 1)
    if HOT_BIN_SPREAD > 0:
        spare = (bins + torch.arange(g, device=dev, dtype=below.dtype) % HOT_BIN_SPREAD)[None, :]
        cold = below != 0
        below += (torch.arange(n, device=dev, dtype=below.dtype) * (rmax + 1))[:, None]
        torch.where(cold, below, spare, out=below)
        del cold
    else:
        below += (torch.arange(n, device=dev, dtype=below.dtype) * (rmax + 1))[:, None]
    hist = torch.bincount(below.view(-1), minlength=bins)[:bins].view(n, rmax + 1)
    del below
    above = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # (n, rmax): items with a score > thresholds[:, r]

    ranks = above + _tie_terms(block, tied, rel, g)
    ranks = ranks.masked_fill_(~valid, torch.iinfo(torch.int64).max).sort(dim=1).values
    flat = ranks[valid] + 1  # valid slots are each row's first n_valid, so rows stay ascending
    return flat.cpu().numpy(), n_valid.cpu().numpy()


def _tie_terms(block: Any, tied: Any, rel: Any, g: int) -> Any:
    """(n, rmax) #{i < j : s_i == s_j} for each relevant item j of ``rel`` (n, rmax) int64.

    tied: (n, G) bool, the items whose score equals some relevant item's score (every relevant
    item among them). Those items, sorted by (row, score, index), form runs of equal scores; an
    item's place in its run is its tie term.
    """
    import torch

    where = torch.nonzero(tied)  # (C, 2) by row, then index
    row, col = where[:, 0], where[:, 1]
    value = block[row, col]
    by_value = torch.sort(value, stable=True).indices
    order = by_value[torch.sort(row[by_value], stable=True).indices]  # by (row, value, index)
    r_sorted, v_sorted = row[order], value[order]
    starts = torch.ones_like(r_sorted, dtype=torch.bool)
    starts[1:] = (r_sorted[1:] != r_sorted[:-1]) | (v_sorted[1:] != v_sorted[:-1])
    place = torch.arange(order.numel(), device=block.device)
    run_start = torch.where(starts, place, torch.zeros_like(place)).cummax(0).values
    tie = torch.empty_like(place)
    tie[order] = place - run_start
    key = row * g + col  # ascending: ``where`` is in (row, index) order
    wanted = torch.arange(rel.shape[0], device=block.device)[:, None] * g + rel
    at = torch.searchsorted(key, wanted.reshape(-1)).clamp_(max=key.numel() - 1)
    return tie[at].view(rel.shape)
