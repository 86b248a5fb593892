"""SUV under TP, TP + sequence parallel, Ulysses CP and TP x CP against one process, fp32.

The reference is computed here in the test process (TP = CP = 1). Each parallel rank loads its
shard of the same weights, runs the same batch through Megatron's DistributedDataParallel, and
reduces gradients exactly as training does (`finalize_model_grads`: the (DP x CP) all-reduce,
the TP sum for sequence-parallel and QK-norm parameters). Loss, output and every parameter
gradient, reassembled from the TP shards, must match within rtol 1e-4, atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.testing.distributed import run_distributed
from megatron_video.testing.models import build_model, random_inputs, randomize, tiny_config

pytestmark = pytest.mark.distributed

MODEL = dict(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
# (frames, height, width) in latents. 2x(3x5) and 4x(3x6) tokens are not multiples of k^2 = 16
# (nor of 4 for the first); 4x(4x4) is. Under TP x CP with sequence parallel the tokens of one CP
# rank must split evenly over TP, hence 3x6 there.
SHAPES_2 = [(2, 6, 10), (4, 8, 8)]
SHAPES_4 = [(4, 6, 12), (4, 8, 8)]
TEXT_LEN = 8


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _reference(model_overrides: dict, shapes, inpaint=None):
    """Full weights, batches and single-process loss / output / gradients."""
    cfg = tiny_config(**model_overrides)
    model = build_model(cfg, inpaint_mask_channels=inpaint)
    state = randomize(model, seed=3)
    cases = []
    for i, (t, h, w) in enumerate(shapes):
        inputs = random_inputs(
            cfg,
            batch=2,
            frames=t,
            height=h,
            width=w,
            text_len=TEXT_LEN,
            seed=10 + i,
            inpaint_mask_channels=inpaint,
        )
        target = torch.randn(
            2, cfg.model.out_channels, t, h, w, generator=torch.Generator().manual_seed(20 + i)
        )
        model.zero_grad()
        out = model(**inputs)
        loss = _loss(out, target)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        cases.append(dict(inputs=inputs, target=target, out=out.detach(), loss=loss.detach(), grads=grads))
    return state, cases


def _parallel_worker(rank, world_size, layouts, model_overrides, state, cases, inpaint=None):
    """Run every layout on every case; return the worst errors seen."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_video.parallel.tensor_parallel_state import partition_dims, shard_state_dict
    from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation

    apply_megatron_cpu_adaptation()
    report = []
    for layout in layouts:
        tp, cp, sp = layout["tp"], layout["cp"], layout["sp"]
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        cfg = tiny_config(
            parallel=dict(tensor_parallel=tp, context_parallel=cp, sequence_parallel=sp), **model_overrides
        )
        model = build_model(cfg, inpaint_mask_channels=inpaint)
        dims = partition_dims(model)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_group = parallel_state.get_tensor_model_parallel_group()
        missing, unexpected = model.load_state_dict(shard_state_dict(state, dims, tp_rank, tp), strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        ddp = DistributedDataParallel(
            config=model.plan.linear_config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
            module=model,
        )
        for case in cases:
            ddp.zero_grad_buffer()
            out = ddp(**case["inputs"])
            loss = _loss(out, case["target"])
            # Each CP rank holds a share of every gradient; DDP averages over (DP x CP).
            (loss * cp).backward()
            finalize_model_grads([ddp])
            worst = {"loss": (loss.detach() - case["loss"]).abs().item()}
            worst["out"] = (out.detach() - case["out"]).abs().max().item()
            grad_err, grad_rel = 0.0, 0.0
            for name, p in model.named_parameters():
                g = p.main_grad.detach().clone()
                if name in dims and tp > 1:
                    parts = [torch.empty_like(g) for _ in range(tp)]
                    torch.distributed.all_gather(parts, g, group=tp_group)
                    g = torch.cat(parts, dim=dims[name])
                ref = case["grads"][name]
                err = (g - ref).abs()
                grad_err = max(grad_err, err.max().item())
                grad_rel = max(grad_rel, (err - 1e-5 - 1e-4 * ref.abs()).max().item())
                if not torch.allclose(g, ref, rtol=1e-4, atol=1e-5):
                    raise AssertionError(
                        f"layout {layout}: gradient of {name} differs, max |diff| {err.max().item():.3e}, "
                        f"max |ref| {ref.abs().max().item():.3e}"
                    )
            worst["grad_max_abs"] = grad_err
            assert worst["loss"] < 1e-5 and worst["out"] < 1e-5, (layout, worst)
            report.append((str(layout), worst))
        parallel_state.destroy_model_parallel()
    return report


def _run(world_size, layouts, model_overrides, shapes, inpaint=None):
    state, cases = _reference(model_overrides, shapes, inpaint)
    # Every parameter must get a non-trivial gradient, or the comparison proves little. The one
    # exception: text queries of the context-pre-only last block feed nothing downstream.
    for name, g in cases[0]["grads"].items():
        if name == "stages.4.1.attn.added_q_layernorm.weight":
            continue
        assert g.abs().max() > 0, f"{name} has an all-zero reference gradient"
    return run_distributed(
        _parallel_worker, world_size, layouts, model_overrides, state, cases, inpaint, timeout_s=400
    )


TWO = [dict(tp=2, cp=1, sp=False), dict(tp=2, cp=1, sp=True), dict(tp=1, cp=2, sp=False)]
FOUR = [dict(tp=2, cp=2, sp=False), dict(tp=2, cp=2, sp=True), dict(tp=1, cp=4, sp=False)]


@pytest.mark.parametrize("variant", ["sparse", "dense", "i2v"])
def test_two_process_layouts(megatron_single, variant):
    overrides = dict(MODEL, sparse_n=[1, 1, 1, 1, 1] if variant == "dense" else [1, 2, 4, 2, 1])
    # The I2V variant adds the inpainting conditioning (masked latents + an 8-channel mask).
    report = _run(2, TWO, overrides, SHAPES_2, inpaint=8 if variant == "i2v" else None)
    assert len(report[0]) == len(TWO) * len(SHAPES_2)


def test_four_process_layouts(megatron_single):
    overrides = dict(MODEL, sparse_n=[1, 2, 4, 2, 1])
    report = _run(4, FOUR, overrides, SHAPES_4)
    assert len(report[0]) == len(FOUR) * len(SHAPES_4)
