"""The validation loss is a property of the weights alone.

The same weights scored at TP=2 (+ SP), CP=2 and DP=2 give the one-process loss table (DP bitwise:
each pair is computed whole on one replica and the table is summed with zeros elsewhere; TP and CP
within the parallel matmul / attention reductions). An evaluation does not depend on, or change, the
training random streams or weights: a run that evaluates between its steps trains bitwise like one
that does not, and the EMA weights are swapped back bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.testing.distributed import run_distributed
from megatron_video.testing.models import randomize, tiny_config

pytestmark = pytest.mark.distributed

MODEL = dict(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
POINTS = [0.1, 0.5, 0.9]


def _batches(cfg, count=3):
    """Fixed validation samples: latents [1, C, 2, 4, 6], text, pooled text, a partial loss mask."""
    from megatron_video.data.batches import TrainBatch

    m, out = cfg.model, []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        mask = torch.ones(1, 2, 4, 6)
        mask[0, 1, :2] = 0 if i == 1 else 1
        text_mask = torch.ones(1, 8)
        text_mask[0, 5:] = 0
        cond = {
            "text_BLC": torch.randn(1, 8, m.caption_channels, generator=g),
            "text_mask_BL": text_mask,
            "pooled_BP": torch.randn(1, m.pooled_projection_dim, generator=g),
            "video_mask_BTHW": mask,
        }
        out.append(TrainBatch(torch.randn(1, m.in_channels, 2, 4, 6, generator=g), cond, mask))
    return out


def _objective(kind, cfg):
    from megatron_video.diffusion import DDPMObjective, FlowMatching

    if kind == "flow":
        return FlowMatching(patch_size=cfg.model.patch_size)
    return DDPMObjective(prediction="v_prediction", snr_gamma=5.0)


def _score(rank, world_size, layout, state):
    """Loss tables of the flow and v-prediction objectives on `state` in this layout."""
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import init_distributed
    from megatron_video.testing.models import build_model
    from megatron_video.training.export import load_full_into
    from megatron_video.training.validation import validation_losses

    cfg = tiny_config(parallel=layout, **MODEL)
    rt = setup_parallel(cfg, init_distributed(cfg.runtime))
    model = build_model(cfg)
    assert not load_full_into(model, rt.plan, state)
    model.eval()
    return {
        kind: validation_losses(model, _objective(kind, cfg), _batches(cfg), POINTS, 3, rt.plan, rt.device)
        for kind in ("flow", "v_prediction")
    }


def _state():
    from megatron_video.testing.models import build_model

    return randomize(build_model(tiny_config(**MODEL)), seed=7, std=0.05)


LAYOUTS = {
    "TP=2 + SP": {"tensor_parallel": 2, "sequence_parallel": True},
    "CP=2": {"context_parallel": 2},
    "DP=2": {},
}


def test_validation_loss_equal_across_layouts(megatron_single):
    state = _state()
    (one,) = run_distributed(_score, 1, {}, state, timeout_s=300)
    for table in one.values():
        assert table.shape == (3, 3) and torch.isfinite(table).all() and (table > 0).all()
        assert table[:, 0].std() > 0 and table[0].std() > 0  # samples and levels really differ
    for name, layout in LAYOUTS.items():
        results = run_distributed(_score, 2, layout, state, timeout_s=300)
        assert all(torch.equal(results[0][k], results[1][k]) for k in one)  # every rank: the same table
        for kind, ref in one.items():
            got = results[0][kind]
            if name == "DP=2":
                assert torch.equal(got, ref), (kind, (got - ref).abs().max())
            else:
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
            print(
                f"{name} {kind}: max |diff| {(got - ref).abs().max().item():.2e}, mean {ref.mean().item():.6f}"
            )


class _Source:
    """Sample p of step s: a fixed random tensor (as in test_trainer_parity)."""

    def __init__(self, cfg):
        self.cfg, self.n = cfg, 0

    def next_batch(self):
        from megatron_video.data.batches import TrainBatch

        g = torch.Generator().manual_seed(1000 + self.n)
        self.n += 1
        m = self.cfg.model
        return TrainBatch(
            torch.randn(2, m.in_channels, 2, 4, 6, generator=g),
            {
                "text_BLC": torch.randn(2, 8, m.caption_channels, generator=g),
                "pooled_BP": torch.randn(2, m.pooled_projection_dim, generator=g),
            },
        )


def _train_twice(rank, world_size, state):
    """The same 4 steps twice: without evaluations, then with two evaluations after steps 2 and 4."""
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import init_distributed
    from megatron_video.testing.models import build_model
    from megatron_video.training.loop import Trainer
    from megatron_video.training.validation import Validator

    cfg = tiny_config(**MODEL)
    cfg.training.global_batch_size = cfg.training.micro_batch_size = 2
    cfg.training.optimizer.lr = 1e-3
    cfg.training.ema_decay = 0.5
    cfg.training.validation.interval = 1
    cfg.training.validation.points = POINTS
    rt = setup_parallel(cfg, init_distributed(cfg.runtime))
    runs = []
    for evaluate_after in ((), (1, 3)):
        model = build_model(cfg)
        model.load_state_dict(state, strict=False)
        trainer = Trainer(cfg, rt, model)
        validator = Validator(cfg, _batches(cfg))
        source, scores = _Source(cfg), []
        for step in range(4):
            trainer.train_step(source)
            if step in evaluate_after:
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
                torch.manual_seed(1000 + step)  # whatever the training streams hold, the score is the same
                scores.append(validator.evaluate(trainer))
                scores.append(validator.evaluate(trainer))
                assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # EMA swapped back
        runs.append((scores, {n: p.detach().clone() for n, p in model.named_parameters()}))
    return runs


def test_evaluation_is_independent_of_training_state(megatron_single):
    (plain, evaluated) = run_distributed(_train_twice, 1, _state(), timeout_s=300)[0]
    scores = evaluated[0]
    assert scores[0] == scores[1] and scores[2] == scores[3]  # bitwise, whatever the RNG state
    assert set(scores[0]) == {"val_loss", "val_loss_ema"}
    assert scores[0]["val_loss"] != scores[0]["val_loss_ema"] and scores[0] != scores[2]
    for name, p in plain[1].items():  # training is unchanged by the evaluations
        assert torch.equal(p, evaluated[1][name]), name
