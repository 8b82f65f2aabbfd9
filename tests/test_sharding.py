"""The shard plan (clipret.parallel.shards) against plain loops, and the shard-wise embedding it drives."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from clipret.parallel.shards import auto_shard_size, shard_batches, shard_bounds, split_contiguous
from conftest import TINY_VIT

# --- slow, obvious references ------------------------------------------------


def ref_shard_of_each_id(n_ids, shard_size):
    """The shard number of every id: ids are dealt out shard_size at a time, in order."""
    owner, shard, used = [], 0, 0
    for _ in range(n_ids):
        if used == shard_size:
            shard, used = shard + 1, 0
        owner.append(shard)
        used += 1
    return owner


def ref_deal(n_items, world):
    """Items dealt to ranks in order: each rank takes floor(n/world) items, the first n % world ranks one more."""
    blocks, item = [], 0
    for rank in range(world):
        take = n_items // world + (1 if rank < n_items % world else 0)
        block = []
        for _ in range(take):
            block.append(item)
            item += 1
        blocks.append(block)
    return blocks


# --- the plan ----------------------------------------------------------------


@pytest.mark.parametrize("n_ids, shard_size", [(0, 4), (1, 4), (16, 4), (17, 4), (5, 100), (1000, 256)])
def test_shard_bounds_match_dealing_ids_in_order(n_ids, shard_size):
    owner = ref_shard_of_each_id(n_ids, shard_size)
    from_bounds = [n for n, (start, stop) in enumerate(shard_bounds(n_ids, shard_size)) for _ in range(start, stop)]
    assert from_bounds == owner


@pytest.mark.parametrize("n_items", [0, 1, 2, 3, 7, 16, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_split_contiguous_deals_blocks_in_rank_order(n_items, world):
    assert [list(split_contiguous(n_items, world, r)) for r in range(world)] == ref_deal(n_items, world)


def test_split_contiguous_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError):
        split_contiguous(4, 2, 2)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 64])
def test_batches_restart_at_every_shard_and_do_not_depend_on_the_other_shards(batch_size):
    bounds = shard_bounds(23, 5)
    batches = shard_batches(bounds, batch_size)
    expected = []
    for start, stop in bounds:  # each shard on its own, cut from its own start
        ids = list(range(start, stop))
        expected += [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    assert batches == expected
    # any subset of shards (what one rank takes) is batched exactly as in the whole plan
    subset = [bounds[1], bounds[3]]
    assert shard_batches(subset, batch_size) == [b for b in batches if bounds[1][0] <= b[0] < bounds[1][1] or bounds[3][0] <= b[0] < bounds[3][1]]


@pytest.mark.parametrize("n_ids", [1, 255, 256, 1000, 65_536, 100_000, 1_000_000, 10_000_000])
def test_auto_shard_size_is_a_multiple_of_256_within_bounds_near_n_over_256(n_ids):
    size = auto_shard_size(n_ids)
    assert size % 256 == 0 and 256 <= size <= 8192
    want = n_ids / 256
    if 256 < want < 8192 - 256:
        assert want <= size < want + 256
    elif want >= 8192:
        assert size == 8192
    else:
        assert size == 256


def test_plan_does_not_depend_on_the_world_size():
    """Every world size splits the same shards: the union of rank blocks is always the full list, in order."""
    bounds = shard_bounds(1000, auto_shard_size(1000))
    for world in (1, 2, 3, 8):
        taken = [bounds[i] for r in range(world) for i in split_contiguous(len(bounds), world, r)]
        assert taken == bounds


# --- embedding shard by shard ------------------------------------------------


def _images(folder, n):
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        ids.append(f"{i:02d}.png")
    (folder / "99.png").write_bytes(b"not an image")
    return ids + ["99.png"]


def test_embed_shards_equals_embed_images_on_each_shard(tmp_path):
    from clipret.embedding.batches import embed_images, embed_shards
    from clipret.model.build import open_encoder
    from clipret.embedding.tta import tta_transform

    ids = _images(tmp_path, 10)
    encoder, spec, _ = open_encoder(str(TINY_VIT), "none")
    transform = tta_transform(spec.preprocess, None)
    bounds = [(0, 4), (4, 4), (4, 9), (9, 11)]  # an empty shard too; the last holds the bad file
    got = list(embed_shards(encoder, tmp_path, ids, bounds, transform, batch_size=3, device="cpu"))
    assert len(got) == len(bounds)
    for (start, stop), (vectors, kept, skipped) in zip(bounds, got):
        want_v, want_kept, want_skipped = embed_images(encoder, tmp_path, ids[start:stop], transform, batch_size=3)
        assert kept == want_kept and skipped == want_skipped
        assert vectors.dtype == np.float32 and vectors.shape == (len(kept), encoder.embed_dim)
        np.testing.assert_array_equal(vectors, want_v)
    assert [s["id"] for s in got[3][2]] == ["99.png"]


def test_resume_takes_the_interrupted_runs_shard_size(tmp_path):
    from clipret.embedding.parts import prepare_parts
    from clipret.errors import ClipretError

    out, ids = tmp_path / "x.npy", [f"{i}.png" for i in range(40)]
    rows = {"batch_size": 3, "tta": None, "exact_decode": False, "decode": "pil", "amp": "none", "device": "cpu"}
    auto = {"shard_size": auto_shard_size(40), "batch_size": 64}

    def prepare(fingerprint, size, resume):
        return prepare_parts(out, ids, fingerprint, {**rows, "shard_size": size}, auto, resume=resume)

    parts, chosen = prepare("fp", 7, False)
    assert chosen["shard_size"] == 7 and parts.is_dir()
    assert prepare("fp", None, True) == (parts, {**rows, "shard_size": 7})
    with pytest.raises(ClipretError, match="--shard-size"):
        prepare("fp", 8, True)
    with pytest.raises(ClipretError, match="another model"):
        prepare("other", None, True)
    assert prepare("fp", None, False)[1]["shard_size"] == auto_shard_size(40)


def test_a_shard_write_racing_a_peers_strict_cleanup_is_a_peer_error(tmp_path, monkeypatch):
    """Another rank failing --strict removes OUT.parts/ while this one writes a shard: this rank
    stops as PeerError (printing nothing), even when the folder vanishes between check and write.
    With one process there is no peer: the write goes ahead."""
    from clipret import artifacts as artifacts_mod
    from clipret.artifacts import Embeddings
    from clipret.parallel.groups import PeerError
    from clipret.errors import ClipretError
    from clipret.embedding.sharded import write_shard

    shard = Embeddings(np.ones((2, 4), dtype=np.float32), ["a.png", "b.png"], fingerprint="f")
    parts = tmp_path / "g.npy.parts"
    parts.mkdir()
    write_shard(parts, 0, shard, world=2)
    assert sorted(p.name for p in parts.iterdir() if p.suffix == ".npy")  # written while the folder exists

    real_save = artifacts_mod.save_embeddings

    def removed_meanwhile(path, *args, **kwargs):  # the peer's cleanup lands mid-write (as seen in CI)
        shutil.rmtree(parts)
        raise ClipretError(f"cannot write {path}: No such file or directory")

    monkeypatch.setattr(artifacts_mod, "save_embeddings", removed_meanwhile)
    with pytest.raises(PeerError):
        write_shard(parts, 1, shard, world=2)
    assert not parts.exists()  # not recreated
    monkeypatch.setattr(artifacts_mod, "save_embeddings", real_save)
    with pytest.raises(PeerError):
        write_shard(parts, 1, shard, world=2)  # already gone before the write
    assert not parts.exists()
    write_shard(parts, 1, shard, world=1)  # one process: no peer to blame, the shard is written
    assert parts.is_dir()


def test_a_peer_removing_the_folder_between_a_shards_two_files_is_a_peer_error(tmp_path, monkeypatch):
    """The peer's cleanup lands after this rank renamed the shard's .npy into place and before its
    manifest: this rank stops as PeerError and does not make OUT.parts/ again (it used to, and
    went on writing into a folder the failed run had removed)."""
    from clipret.artifacts import Embeddings
    from clipret.parallel.groups import PeerError
    from clipret.embedding.sharded import write_shard

    shard = Embeddings(np.ones((2, 4), dtype=np.float32), ["a.png", "b.png"], fingerprint="f")
    parts = tmp_path / "g.npy.parts"
    parts.mkdir()
    real_replace = os.replace

    def then_peer_removes(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".npy"):
            shutil.rmtree(parts)

    monkeypatch.setattr(os, "replace", then_peer_removes)
    with pytest.raises(PeerError):
        write_shard(parts, 0, shard, world=2)
    assert not parts.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_discarding_the_parts_folder_takes_it_away_before_deleting_its_files(tmp_path, monkeypatch):
    """A rank writing a shard must never see OUT.parts/ half deleted (its temp file gone, the
    folder still there: then its write error would look like its own, a second error line)."""
    from clipret.embedding import parts as embed_parts
    from clipret.embedding.parts import discard_parts

    parts = tmp_path / "g.npy.parts"
    parts.mkdir()
    for name in ("run.json", "shard-000000.npy", ".shard-000001.npy.x.tmp"):
        (parts / name).write_text("x")
    seen = []
    real_rmtree = shutil.rmtree

    def watching(path, *args, **kwargs):
        seen.append(parts.exists())
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(embed_parts.shutil, "rmtree", watching)
    discard_parts(parts)
    assert seen == [False]  # the folder's name was gone before any file in it was deleted
    assert list(tmp_path.iterdir()) == []  # and nothing is left beside it
    discard_parts(parts)  # already gone (two ranks failing at once): nothing to do
    assert seen == [False]
