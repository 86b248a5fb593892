"""The Trainer step: DP=2 equals DP=1 with gradient accumulation; a NaN step is skipped.

Both runs see the same global batches (sample p of step s is the same tensor wherever it is
processed) and the same per-sample noise, so loss, every reduced gradient and the updated
parameters must agree within rtol 1e-4 / atol 1e-5. DP=2 runs with the communication overlap on
(the default for more than one rank: gradient reduction during the backward pass, with the
distributed optimizer the parameter gather during the next forward pass, in many small buckets)
and, once, with it off.
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.testing.distributed import run_distributed
from megatron_video.testing.models import randomize, tiny_config

pytestmark = pytest.mark.distributed

STEPS = 3
GLOBAL_BATCH = 4
BUCKET = 4000
"""Parameters per DDP bucket: the tiny model is split into several buckets."""


class _FixedBatches:
    """Sample p of step s is a fixed random tensor; this rank takes its positions in order."""

    def __init__(self, cfg, dp_rank, accumulation, mbs):
        self.cfg, self.dp_rank, self.accumulation, self.mbs = cfg, dp_rank, accumulation, mbs
        self.step, self.micro = 0, 0

    def _sample(self, step, pos):
        g = torch.Generator().manual_seed(1000 * step + pos)
        m = self.cfg.model
        return (
            torch.randn(1, m.in_channels, 2, 4, 6, generator=g),
            torch.randn(1, 8, m.caption_channels, generator=g),
            torch.randn(1, m.pooled_projection_dim, generator=g),
        )

    def next_batch(self):
        from megatron_video.data.batches import TrainBatch

        first = (self.dp_rank * self.accumulation + self.micro) * self.mbs
        parts = [self._sample(self.step, p) for p in range(first, first + self.mbs)]
        x0, text, pooled = (torch.cat(t) for t in zip(*parts))
        self.micro += 1
        if self.micro == self.accumulation:
            self.micro, self.step = 0, self.step + 1
        return TrainBatch(x0, {"text_BLC": text, "pooled_BP": pooled})

    def state_dict(self):
        return {"step": self.step, "micro": self.micro}

    def load_state_dict(self, state):
        self.step, self.micro = state["step"], state["micro"]


def _train(rank, world_size, state, micro_batch, nan_step, distributed_optimizer, overlap=None):
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.parallel.tensor_parallel_state import partition_dims
    from megatron_video.platform.launch import init_distributed
    from megatron_video.testing.models import build_model
    from megatron_video.training import loop
    from megatron_video.training.loop import Trainer

    cfg = tiny_config(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
    cfg.training.global_batch_size = GLOBAL_BATCH
    cfg.training.micro_batch_size = micro_batch
    cfg.training.optimizer.lr = 1e-3
    cfg.training.optimizer.distributed_optimizer = distributed_optimizer
    cfg.training.ema_decay = 0.9
    cfg.parallel.overlap_grad_reduce = cfg.parallel.overlap_param_gather = overlap
    cfg.parallel.bucket_size = BUCKET
    rt = setup_parallel(cfg, init_distributed(cfg.runtime))
    model = build_model(cfg)
    model.load_state_dict(state, strict=False)
    assert not partition_dims(model) or rt.plan.tensor_parallel == 1
    trainer = Trainer(cfg, rt, model)
    source = _FixedBatches(cfg, rt.data_parallel_rank, trainer.accumulation, micro_batch)
    grads_per_step = []

    def capture(tr):
        if tr.step == nan_step:
            next(iter(tr.model.parameters())).main_grad.fill_(float("nan"))
        grads_per_step.append({n: p.main_grad.detach().clone() for n, p in tr.model.named_parameters()})

    trainer.before_optimizer_step = capture
    # Per step: which buckets' reductions were already running when the backward pass ended.
    in_flight = []
    finalize = loop.finalize_grads

    def record_then_finalize(chunks, plan):
        in_flight.append([g.grad_reduce_handle is not None for c in chunks for g in c.bucket_groups])
        finalize(chunks, plan)

    loop.finalize_grads = record_then_finalize
    metrics = [trainer.train_step(source) for _ in range(STEPS)]
    trainer.sync_params()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = {n: t.clone() for n, t in trainer.ema.shadow.items()}
    buckets = len(trainer.ddp.bucket_groups)
    return metrics, grads_per_step, params, ema, trainer.accumulation, trainer.overlap, buckets, in_flight


def _state():
    from megatron_video.testing.models import build_model

    cfg = tiny_config(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
    return randomize(build_model(cfg), seed=5, std=0.05)


def _compare(a, b, what):
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


@pytest.mark.parametrize(
    "distributed_optimizer, overlap",
    [(False, None), (True, None), (True, False)],
    ids=["plain-overlap", "distributed-overlap", "distributed-no-overlap"],
)
def test_dp2_equals_dp1_with_accumulation(megatron_single, distributed_optimizer, overlap):
    state = _state()
    (one,) = run_distributed(_train, 1, state, 1, -1, False, timeout_s=300)
    two = run_distributed(_train, 2, state, 1, -1, distributed_optimizer, overlap, timeout_s=300)
    assert one[4] == 4 and two[0][4] == 2  # accumulation steps: 4 vs 2 micro-batches per step
    assert not one[5].grad_reduce  # one rank: nothing to overlap
    on = overlap is None
    assert (two[0][5].grad_reduce, two[0][5].param_gather) == (on, on and distributed_optimizer)
    assert two[0][6] > (2 if on else 0)  # several buckets when overlapping, one otherwise
    # With the overlap every bucket's reduction started during the backward pass, from the second
    # step on (Megatron learns in the first which gradients make a bucket complete); without, none.
    for rank_result in two:
        in_flight = rank_result[7]
        assert not any(in_flight[0]) and all(all(step) == on and any(step) == on for step in in_flight[1:])
    for rank_result in two:
        metrics, grads, params, ema, *_ = rank_result
        for m1, m2 in zip(one[0], metrics):
            assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
            assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
        if not distributed_optimizer:
            # The distributed optimizer reduce-scatters: each rank's buffer is only valid on its
            # shard, so full gradients are compared for the plain optimizer only.
            for s in range(STEPS):
                _compare(one[1][s], grads[s], f"step {s} grad")
        _compare(one[2], params, "param")
        _compare(one[3], ema, "ema")
    # Parameters moved: the comparison is not between two untouched models.
    assert any((one[2][k] - state[k]).abs().max() > 1e-4 for k in state)


def test_nan_gradient_step_is_skipped(megatron_single):
    state = _state()
    metrics, grads, params, ema, *_ = run_distributed(_train, 2, state, 2, 1, True, timeout_s=300)[0]
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert all(torch.isfinite(p).all() for p in params.values())
