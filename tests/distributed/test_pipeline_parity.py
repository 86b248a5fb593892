"""Pipeline parallelism: PP=2 and PP=2 x VPP=2 Trainer steps equal one process, fp32.

The reference is the Trainer at PP=1 in one process. The pipelined runs load the same weights
into their chunks and see the same global batches (sample p of step s is a fixed tensor) and the
same per-sample noise over several micro-batches. Loss, gradient norm, every reduced gradient
(the replicated conditioning embedder on every chunk included), the updated parameters and the
EMA must agree within rtol 1e-4 / atol 1e-5. The negative check turns off Megatron's
conditional-embedder all-reduce (`has_cond_embedder`) and sees the embedder gradients go wrong.

Communication overlap: PP=2 runs without it (one data-parallel rank: nothing to overlap), PP=2 x
VPP=2 with the gradient reduction forced on (the schedule's no_sync / grad_sync wiring over a group
of one), PP=2 x VPP=2 x CP=2 with it on by default (reduction over CP during the backward pass), and
PP=2 x DP=2 with it on by default and the distributed optimizer (reduce-scatter during the backward
pass, parameter gather during the next forward pass, first-stage gradients in several buckets).

The tiny model has U-stages of 1, 2, 2, 2, 1 blocks. PP=2 cuts it at block 4 (two pending skips
cross); PP=2 x VPP=2 at blocks 2, 4 and 6, so one skip passes two chunks untouched and the
interleaved schedule sends an activation and a gradient to the same peer in one step (the gloo
message-order trap of megatron_on_cpu.md).
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.testing.distributed import run_distributed
from megatron_video.testing.models import randomize, tiny_config

pytestmark = pytest.mark.distributed

MODEL = dict(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32, num_layers=[1, 2, 2, 2, 1])
MICRO_BATCHES = 4
STEPS = 2
EMBEDDER = "time_text_embed."
BUCKET = 4000
"""Parameters per DDP bucket: a first-stage chunk of the tiny model is split into several."""


def _config(parallel: dict | None = None):
    cfg = tiny_config(parallel=parallel, **MODEL)
    t = cfg.training
    t.global_batch_size = MICRO_BATCHES
    t.micro_batch_size = 1
    t.optimizer.lr = 1e-3
    t.ema_decay = 0.9
    return cfg


class _FixedBatches:
    """Sample p of step s is a fixed random tensor (with text, video and loss masks); this
    data-parallel rank takes its positions in order."""

    def __init__(self, cfg, dp_rank=0, accumulation=MICRO_BATCHES):
        self.cfg, self.dp_rank, self.accumulation = cfg, dp_rank, accumulation
        self.step, self.micro = 0, 0

    def next_batch(self):
        from megatron_video.data.batches import TrainBatch

        m = self.cfg.model
        pos = self.dp_rank * self.accumulation + self.micro
        g = torch.Generator().manual_seed(1000 * self.step + pos)
        x0 = torch.randn(1, m.in_channels, 2, 4, 6, generator=g)
        cond = {
            "text_BLC": torch.randn(1, 8, m.caption_channels, generator=g),
            "pooled_BP": torch.randn(1, m.pooled_projection_dim, generator=g),
            "text_mask_BL": (torch.arange(8) < 8 - pos).float()[None],
            "video_mask_BTHW": torch.ones(1, 2, 4, 6),
        }
        cond["video_mask_BTHW"][0, 1, : pos % 3] = 0
        loss_mask = cond["video_mask_BTHW"].clone()
        self.micro += 1
        if self.micro == self.accumulation:
            self.micro, self.step = 0, self.step + 1
        return TrainBatch(x0, cond, loss_mask)

    def state_dict(self):
        return {"step": self.step, "micro": self.micro}

    def load_state_dict(self, state):
        self.step, self.micro = state["step"], state["micro"]


def _train(rank, world_size, state, layouts):
    """Run STEPS Trainer steps per layout; per layout: metrics, and grads, params and EMA per chunk
    (tensor-parallel shards merged back to full tensors)."""
    import torch.distributed as dist

    from megatron_video.models.suv.model import SUVModel
    from megatron_video.parallel.pipeline import build_model_chunks
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.parallel.tensor_parallel_state import partition_dims, shard_state_dict
    from megatron_video.platform.launch import Runtime
    from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation
    from megatron_video.training.loop import Trainer

    apply_megatron_cpu_adaptation()
    results = []
    for layout in layouts:
        pp, tp = layout.get("pp", 1), layout.get("tp", 1)
        parallel = dict(
            pipeline_parallel=pp,
            virtual_pipeline=layout.get("vpp"),
            tensor_parallel=tp,
            sequence_parallel=layout.get("sp", False),
            context_parallel=layout.get("cp", 1),
        )
        cfg = _config(parallel)
        cfg.parallel.overlap_grad_reduce = layout.get("overlap")
        cfg.parallel.bucket_size = BUCKET
        rt = setup_parallel(cfg, Runtime(torch.device("cpu"), rank, world_size, rank))
        chunks = build_model_chunks(
            lambda blocks, cfg=cfg, rt=rt: SUVModel(cfg.model, rt.plan, blocks=blocks), cfg.model.total_layers
        )
        dims = {}
        for chunk in chunks:
            dims.update(partition_dims(chunk))
            own = {k: v for k, v in state.items() if k in chunk.state_dict()}
            missing, _ = chunk.load_state_dict(
                shard_state_dict(own, dims, rt.plan.tensor_parallel_rank, tp), strict=False
            )
            assert all(k.endswith("_extra_state") for k in missing), missing
        trainer = Trainer(cfg, rt, chunks if pp > 1 else chunks[0])
        expected = layout.get("overlap", rt.data_parallel * rt.plan.context_parallel > 1)
        assert trainer.overlap.grad_reduce == expected, (layout, trainer.overlap)
        assert trainer.overlap.param_gather == (expected and rt.data_parallel > 1), (layout, trainer.overlap)
        if not layout.get("cond_allreduce", True):
            rt.plan.linear_config.has_cond_embedder = False

        def full(tensors, tp=tp, group=rt.plan.tensor_parallel_group, dims=dims):
            out = {}
            for name, t in tensors.items():
                if name in dims and tp > 1:
                    parts = [torch.empty_like(t) for _ in range(tp)]
                    dist.all_gather(parts, t.contiguous(), group=group)
                    t = torch.cat(parts, dim=dims[name])
                out[name] = t.detach().clone()
            return out

        grads = []

        def capture(tr, grads=grads, chunks=chunks, full=full):
            grads.append([full({n: p.main_grad for n, p in c.named_parameters()}) for c in chunks])

        trainer.before_optimizer_step = capture
        source = _FixedBatches(cfg, rt.data_parallel_rank, trainer.accumulation)
        metrics = [trainer.train_step(source) for _ in range(STEPS)]
        trainer.sync_params()
        params = [full(dict(c.named_parameters())) for c in chunks]
        results.append(dict(metrics=metrics, grads=grads, params=params, ema=full(trainer.ema.shadow)))
    return results


@pytest.mark.parametrize(
    "overrides, inpaint",
    [
        ({}, None),
        (dict(num_layers=[1, 2, 2, 2, 1], skip_connection_zero_init=False), 8),
        (dict(num_layers=[2, 1, 3, 1, 2], skip_connection=False), None),
    ],
    ids=["tiny", "skip_norms_i2v", "no_skips"],
)
def test_chunks_in_sequence_equal_the_full_model(megatron_single, overrides, inpaint):
    """One process: chunks chained by hand give the full model's output bitwise and hold each of
    its parameters exactly once (replicated embedder aside), under the same names."""
    from megatron_video.models.suv.model import SUVModel
    from megatron_video.parallel.pipeline import chunk_block_ranges
    from megatron_video.testing.models import build_model, random_inputs

    cfg = tiny_config(**overrides)
    full = build_model(cfg, inpaint_mask_channels=inpaint)
    state = randomize(full, seed=1)
    inputs = random_inputs(cfg, 2, 2, 4, 6, 8, seed=2, inpaint_mask_channels=inpaint)
    with torch.no_grad():
        expected = full(**inputs)
    for num_chunks in (2, 3, 5):
        ranges = chunk_block_ranges(cfg.model.total_layers, num_chunks)
        chunks = [SUVModel(cfg.model, full.plan, inpaint_mask_channels=inpaint, blocks=r) for r in ranges]
        held = []
        hidden = None
        with torch.no_grad():
            for chunk in chunks:
                own = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
                chunk.load_state_dict({k: state[k] for k in own}, strict=False)
                held += [k for k in own if not k.startswith(EMBEDDER)]
                chunk.set_input_tensor([hidden])
                hidden = chunk(**inputs)
        assert torch.equal(hidden, expected), num_chunks
        assert sorted(held) == sorted(k for k in state if not k.startswith(EMBEDDER))


def _state():
    from megatron_video.testing.models import build_model

    return randomize(build_model(_config()), seed=5, std=0.05)


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _assert_matches(ref, run, what, check_embedder=True):
    """Every tensor of `run` (a subset of the names) equals the reference."""
    for name, tensor in run.items():
        if not check_embedder and name.startswith(EMBEDDER):
            continue
        err = (tensor - ref[name]).abs().max().item()
        assert _close(tensor, ref[name]), f"{what} {name}: max |diff| {err:.3e}"


@pytest.fixture(scope="module")
def reference(megatron_single):
    state = _state()
    ((ref,),) = run_distributed(_train, 1, state, [dict()], timeout_s=300)
    # Parameters moved, and every reference gradient carries signal (the text queries of the
    # context-pre-only last block feed nothing downstream).
    assert any((ref["params"][0][k] - state[k]).abs().max() > 1e-4 for k in state)
    for name, g in ref["grads"][0][0].items():
        assert name == "stages.4.0.attn.added_q_layernorm.weight" or g.abs().max() > 0, name
    return state, ref


def _check_layout(ref, ranks, index, layout):
    """Loss, grad norm, every gradient on every chunk (both steps), parameters and EMA equal the
    reference."""
    ref_grads = [g[0] for g in ref["grads"]]
    held = set()
    for rank_results in ranks:
        run = rank_results[index]
        for m_ref, m in zip(ref["metrics"], run["metrics"]):
            assert m["loss"] == pytest.approx(m_ref["loss"], rel=1e-5), (layout, m, m_ref)
            assert m["grad_norm"] == pytest.approx(m_ref["grad_norm"], rel=1e-4), (layout, m, m_ref)
        # Under the distributed optimizer (DP > 1) a gradient buffer holds only this rank's reduced
        # shard: the gradient norm above covers the gradients then.
        for step in range(STEPS if layout.get("dp", 1) == 1 else 0):
            for chunk_grads in run["grads"][step]:
                _assert_matches(ref_grads[step], chunk_grads, f"{layout} step {step} grad")
        # Under CP a gradient is a sum of shares, and an entry that is zero up to round-off
        # (|g| ~ 1e-11) can change sign; Adam turns that into a +-lr step. This happens at CP=2
        # without pipelining too, so updated parameters are compared for the other layouts only.
        for chunk_params in run["params"]:
            if layout.get("cp", 1) == 1:
                _assert_matches(ref["params"][0], chunk_params, f"{layout} param")
            held |= set(chunk_params)
            assert any(k.startswith(EMBEDDER) for k in chunk_params)
        if layout.get("cp", 1) == 1:
            _assert_matches(ref["ema"], run["ema"], f"{layout} ema")
    # The chunks hold every parameter of the full model, under the same names.
    assert held == set(ref["params"][0]), layout


def test_pipeline_matches_one_process(reference):
    state, ref = reference
    layouts = [dict(pp=2), dict(pp=2, vpp=2, overlap=True), dict(pp=2, cond_allreduce=False)]
    ranks = run_distributed(_train, 2, state, layouts, timeout_s=500)
    _check_layout(ref, ranks, 0, layouts[0])
    _check_layout(ref, ranks, 1, layouts[1])
    # Without the conditional-embedder all-reduce each stage keeps its own share of the embedder
    # gradient: wrong on both stages, while every other gradient still matches.
    ref_grads = ref["grads"][0][0]
    for rank_results in ranks:
        (chunk_grads,) = rank_results[2]["grads"][0]
        _assert_matches(ref_grads, chunk_grads, "no cond all-reduce grad", check_embedder=False)
        embedder = [n for n in chunk_grads if n.startswith(EMBEDDER)]
        assert embedder and not any(_close(chunk_grads[n], ref_grads[n]) for n in embedder)


def test_pipeline_with_sequence_and_context_parallel(reference):
    """Chunks keep the TP + sequence-parallel and Ulysses CP splits, and PP x DP with the overlapped
    reduce-scatter and parameter gather of the distributed optimizer (4 processes)."""
    state, ref = reference
    layouts = [dict(pp=2, tp=2, sp=True), dict(pp=2, vpp=2, cp=2), dict(pp=2, dp=2)]
    ranks = run_distributed(_train, 4, state, layouts, timeout_s=550)
    for index, layout in enumerate(layouts):
        _check_layout(ref, ranks, index, layout)
