"""parallel.overlap_grad_reduce / overlap_param_gather / bucket_size: validation before launch, what
each run resolves them to, the Megatron DDP settings they become, and the pipeline schedule's hooks."""

from __future__ import annotations

import pytest

from megatron_video.config import build_config
from megatron_video.config.loader import ConfigError
from megatron_video.training.overlap import CommOverlap, ddp_config, resolve_overlap

TINY = {"model": {"flavor": "tiny"}, "shape": {"text_length": 16, "height": 64, "width": 64}}


def _cfg(parallel=None, training=None, runtime=None):
    data = {**TINY, "parallel": dict(parallel or {}), "training": dict(training or {})}
    if runtime:
        data["runtime"] = runtime
    return build_config(data)


@pytest.mark.parametrize(
    "parallel, training, message",
    [
        ({"bucket_size": 0}, {}, "parallel.bucket_size must be >= 1"),
        ({"overlap_grad_reduce": True}, {"clip": {"mode": "batch_drop"}}, "clip.mode=batch_drop"),
        (
            {"overlap_param_gather": True, "overlap_grad_reduce": False},
            {},
            "needs parallel.overlap_grad_reduce",
        ),
        (
            {"overlap_param_gather": True},
            {"optimizer": {"distributed_optimizer": False}},
            "set training.optimizer.distributed_optimizer=true",
        ),
        ({"overlap_param_gather": True}, {"clip": {"mode": "batch_drop"}}, "batch_drop turns off"),
    ],
)
def test_impossible_combinations_fail_before_launch(parallel, training, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(parallel, training)


@pytest.mark.parametrize(
    "parallel, training, dp, dist_opt, expected",
    [
        # Defaults: on when gradients are reduced over more than one rank (DP x CP).
        ({}, {}, 1, False, (False, False)),
        ({}, {}, 2, True, (True, True)),
        ({}, {}, 2, False, (True, False)),  # the plain optimizer all-reduces: nothing to gather
        ({"context_parallel": 2}, {}, 1, False, (True, False)),
        ({"context_parallel": 2}, {}, 1, True, (True, True)),  # bf16 at DP = 1: distributed optimizer
        # Batch dropping needs unreduced gradients: the default turns the overlap off.
        ({}, {"clip": {"mode": "batch_drop"}}, 4, True, (False, False)),
        # Explicit settings win; the gather only where the distributed optimizer runs.
        ({"overlap_grad_reduce": False}, {}, 2, True, (False, False)),
        ({"overlap_param_gather": False}, {}, 2, True, (True, False)),
        ({"overlap_grad_reduce": True}, {}, 1, False, (True, False)),
        ({"overlap_grad_reduce": True, "overlap_param_gather": True}, {}, 1, False, (True, False)),
    ],
)
def test_resolution(parallel, training, dp, dist_opt, expected):
    overlap = resolve_overlap(_cfg(parallel, training), dp, dist_opt)
    assert (overlap.grad_reduce, overlap.param_gather) == expected


def test_megatron_settings():
    cfg = _cfg({"bucket_size": 1234})
    overlap = resolve_overlap(cfg, 2, True)
    assert overlap == CommOverlap(True, True, 1234)
    ddp = ddp_config(overlap, True)
    assert (ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.use_distributed_optimizer) == (
        True,
        True,
        True,
    )
    assert ddp.bucket_size == 1234 and ddp.grad_reduce_in_fp32
    off = ddp_config(CommOverlap(), False)
    assert not (off.overlap_grad_reduce or off.overlap_param_gather or off.use_distributed_optimizer)


def test_pipeline_schedule_gets_each_chunks_sync_functions():
    from megatron_video.parallel.pipeline import _grad_sync_funcs

    class Chunk:
        def __init__(self, overlap):
            self.ddp_config = ddp_config(CommOverlap(grad_reduce=overlap), False)

        def no_sync(self):
            return "no_sync"

        def start_grad_sync(self, *unused):
            return "start"

    assert _grad_sync_funcs([Chunk(False)]) == (None, None)
    one = Chunk(True)
    assert _grad_sync_funcs([one]) == (one.no_sync, one.start_grad_sync)
    chunks = [Chunk(True), Chunk(True)]
    no_sync, grad_sync = _grad_sync_funcs(chunks)
    assert no_sync == [c.no_sync for c in chunks] and grad_sync == [c.start_grad_sync for c in chunks]
