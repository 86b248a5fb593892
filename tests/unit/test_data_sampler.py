"""Megabatch bucket sampler: replica ranks agree, one shape per batch, exact resume, documented repeats."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from megatron_video.data.sampler import MegabatchBucketSampler

# 4 buckets of uneven size, interleaved in dataset order
KEYS = [
    k
    for i in range(60)
    for k in (["33x64x64"] * 3 + ["1x64x96"] * 2 + ["17x64x64"] + ["1x32x32"] * (i % 7 == 0))
]


def make(dp_rank=0, dp_size=4, batch_size=2, **kw) -> MegabatchBucketSampler:
    kw = {"seed": 7, "drop_threshold": 0.0, **kw}
    return MegabatchBucketSampler(KEYS, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, **kw)


def epoch_batches(sampler: MegabatchBucketSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_all_ranks_of_a_replica_get_identical_batches():
    tp, cp, dp = 2, 2, 2  # 8 ranks; ranks sharing a dp coordinate form one model replica's group
    per_rank = {}
    for rank in range(tp * cp * dp):
        dp_rank = rank // (tp * cp)
        per_rank[rank] = (dp_rank, epoch_batches(make(dp_rank=dp_rank, dp_size=dp), 3))
    for rank, (dp_rank, batches) in per_rank.items():
        same = [b for r, (d, b) in per_rank.items() if d == dp_rank]
        assert all(b == batches for b in same), f"rank {rank} differs from its replica"
    assert per_rank[0][1] != per_rank[tp * cp][1]  # different replicas see different data
    # every rank's view is a slice of the same global plan
    plan = make(dp_size=dp).plan(3)
    for dp_rank in range(dp):
        assert plan.batches[:, dp_rank].tolist() == per_rank[dp_rank * tp * cp][1]


@pytest.mark.parametrize("group_data", [True, False])
def test_one_shape_per_batch(group_data):
    for dp_rank in range(4):
        sampler = make(dp_rank=dp_rank, group_data=group_data)
        for epoch in range(3):
            for batch in epoch_batches(sampler, epoch):
                assert len(batch) == 2
                assert len({KEYS[i] for i in batch}) == 1, batch


def test_no_repeats_beyond_padding_and_replacement():
    for group_data in (True, False):
        sampler = make(group_data=group_data)
        plan = sampler.plan(0)
        items = plan.batches.ravel().tolist()
        assert len(items) == sampler.samples_per_epoch == len(KEYS) + plan.num_padded
        repeats = len(items) - len(set(items))
        assert repeats <= plan.num_padded + plan.num_replaced
        if group_data:  # bucket-ordered: only megabatches at bucket borders mix shapes
            assert plan.num_replaced < len(KEYS) // 10
    # one bucket: nothing is replaced, every sample appears, repeats are exactly the tail padding
    keys = ["9x8x8"] * 37
    single = MegabatchBucketSampler(keys, batch_size=3, dp_rank=0, dp_size=4, drop_threshold=0.0)
    plan = single.plan(5)
    items = plan.batches.ravel().tolist()
    assert plan.num_replaced == 0 and plan.num_padded == 48 - 37
    assert set(items) == set(range(37)) and len(items) - len(set(items)) == plan.num_padded


def test_padding_of_an_empty_rank_chunk_copies_a_batch():
    # 9 samples, dp 4 x batch 2: the second megabatch holds 1 sample; ranks 1-3 get empty chunks
    single = MegabatchBucketSampler(["a"] * 9, batch_size=2, dp_rank=0, dp_size=4, drop_threshold=0.0)
    plan = single.plan(0)
    assert plan.batches.shape == (2, 4, 2) and plan.num_padded == 16 - 9
    tail = next(mb for mb in plan.batches.tolist() if len({i for b in mb for i in b}) < 8)
    assert len({i for b in tail for i in b}) == 1  # the one leftover sample fills all four ranks


@pytest.mark.parametrize("dp_rank", [0, 3])
def test_resume_at_any_point_continues_exactly(dp_rank):
    full = make(dp_rank=dp_rank)
    m, n = full.megabatch_size, full.num_megabatches
    reference = epoch_batches(full, 0) + epoch_batches(full, 1) + epoch_batches(full, 2)
    assert len(reference) == 3 * n
    for step in range(0, 2 * n + 1):
        resumed = make(dp_rank=dp_rank, consumed_samples=step * m)
        assert resumed.epoch == step // n and len(resumed) == n - step % n
        got = list(resumed)  # the rest of the resumed epoch
        resumed.set_epoch(resumed.epoch)  # re-announcing the same epoch keeps the offset
        assert list(resumed) == got
        for epoch in range(resumed.epoch + 1, 3):
            got += epoch_batches(resumed, epoch)
        assert got == reference[step:], f"resume after {step} megabatches differs"


def test_set_epoch_reshuffles_deterministically():
    a, b = make(), make()
    e1a, e1b = epoch_batches(a, 1), epoch_batches(b, 1)
    assert e1a == e1b
    assert epoch_batches(a, 0) != e1a
    assert epoch_batches(make(seed=8), 1) != e1a
    assert epoch_batches(a, 1) == e1a  # iterating again, or after other epochs, gives the same order


def test_rare_buckets_dropped_and_logged(caplog):
    counts = Counter(KEYS)  # 33x64x64: 180, 1x64x96: 120, 17x64x64: 60, 1x32x32: 9
    with caplog.at_level(logging.INFO, logger="megatron_video.data.sampler"):
        sampler = make(drop_threshold=4.0)  # 4 x global batch 8 = 32
    assert "1x32x32" not in sampler.bucket_counts and len(sampler.indices) == len(KEYS) - counts["1x32x32"]
    assert "dropped 9 samples in 1 buckets" in caplog.text
    kept = {i for b in epoch_batches(sampler, 0) for i in b}
    assert all(KEYS[i] != "1x32x32" for i in kept)
    # the threshold counts in global batches, which include gradient accumulation when given
    assert "17x64x64" not in make(drop_threshold=4.0, global_batch_size=16).bucket_counts
    with pytest.raises(ValueError, match="no bucket has"):
        make(drop_threshold=100.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of"):
        make(consumed_samples=3)
    with pytest.raises(ValueError, match="dp_rank"):
        make(dp_rank=4)
