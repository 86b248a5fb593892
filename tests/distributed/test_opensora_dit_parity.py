"""The v1.2 / v1.3 DiT under TP, TP + sequence parallel, Ulysses CP, TP x CP and PP (with VPP)
against one process, fp32.

The reference is computed in the test process (one rank). Each parallel rank loads its shard of the
same weights, runs the same batches through Megatron's DistributedDataParallel (and, for PP,
Megatron's pipeline schedule) and reduces gradients as training does (`finalize_model_grads`: the
(DP x CP) all-reduce, the TP sum of sequence-parallel parameters, the PP sum of the replicated
AdaLN-single and caption projection). Loss, output and every parameter gradient, reassembled from
the TP shards, must match within rtol 1e-4, atol 1e-5.

Variants: v1.2 (dense blocks) and v1.3 (Skiparse k = 4 on blocks 2, 3 of 6: Single and Group), T2V
and I2V, each in every layout. All 2-rank layouts run in one launch and all 4-rank ones in another. Shapes: 2x(3x5) and 4x(3x6) tokens are not multiples of k^2 = 16, 4x(4x4) is.
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.testing.distributed import run_distributed
from megatron_video.testing.models import randomize
from megatron_video.testing.opensora_dit import build_dit, random_dit_inputs, tiny_dit_config

pytestmark = pytest.mark.distributed

MODEL = dict(caption_channels=32)
SHAPES_2 = [(2, 6, 10), (4, 8, 8)]
SHAPES_4 = [(4, 6, 12), (4, 8, 8)]
TEXT_LEN = 8
REPLICATED = ("adaln_single.", "caption_projection.")
VARIANTS = {
    "v12_t2v": ("v1.2", None),
    "v13_t2v": ("v1.3", None),
    "v12_i2v": ("v1.2", 4),
    "v13_i2v": ("v1.3", 4),
}


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _reference(variant: str, shapes, **model):
    """Full weights, batches and single-process loss / output / gradients per batch, and the
    gradient of the mean loss over all batches (the pipeline's micro-batches)."""
    version, inpaint = VARIANTS[variant]
    overrides = {**MODEL, **model}
    cfg = tiny_dit_config(version=version, **overrides)
    model = build_dit(cfg, inpaint_mask_channels=inpaint)
    state = randomize(model, seed=3, std=0.1)
    cases = []
    model.zero_grad()
    for i, (t, h, w) in enumerate(shapes):
        inputs = random_dit_inputs(cfg, 2, t, h, w, TEXT_LEN, seed=10 + i, inpaint_mask_channels=inpaint)
        target = torch.randn(
            2, cfg.model.out_channels, t, h, w, generator=torch.Generator().manual_seed(20 + i)
        )
        before = {n: p.grad.clone() if p.grad is not None else 0 for n, p in model.named_parameters()}
        out = model(**inputs)
        loss = _loss(out, target)
        loss.backward()
        grads = {n: (p.grad - before[n]).detach().clone() for n, p in model.named_parameters()}
        cases.append(dict(inputs=inputs, target=target, out=out.detach(), loss=loss.detach(), grads=grads))
    mean_grads = {n: p.grad.detach() / len(shapes) for n, p in model.named_parameters()}
    for name, g in cases[0]["grads"].items():  # every parameter carries signal
        assert g.abs().max() > 0, f"{name} has an all-zero reference gradient"
    return dict(
        version=version, inpaint=inpaint, overrides=overrides, state=state, cases=cases, mean_grads=mean_grads
    )


def _full_grad(name, p, dims, tp, tp_group):
    g = p.main_grad.detach().clone()
    if name in dims and tp > 1:
        parts = [torch.empty_like(g) for _ in range(tp)]
        torch.distributed.all_gather(parts, g, group=tp_group)
        g = torch.cat(parts, dim=dims[name])
    return g


def _check_grads(layout, chunk, ref_grads, dims, tp, tp_group) -> float:
    worst = 0.0
    for name, p in chunk.named_parameters():
        g, ref = _full_grad(name, p, dims, tp, tp_group), ref_grads[name]
        err = (g - ref).abs().max().item()
        worst = max(worst, err)
        if not torch.allclose(g, ref, rtol=1e-4, atol=1e-5):
            raise AssertionError(
                f"layout {layout}: gradient of {name} differs, max |diff| {err:.3e}, max |ref| {ref.abs().max().item():.3e}"
            )
    return worst


def _ddp(model):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(
        config=model.plan.linear_config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        module=model,
    )


def _parallel_worker(rank, world_size, layouts, ref):
    """TP / SP / CP layouts on every batch; returns the worst errors seen."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from megatron_video.parallel.tensor_parallel_state import partition_dims
    from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation
    from megatron_video.testing.opensora_dit import shard_for_model

    apply_megatron_cpu_adaptation()
    report = []
    for layout in layouts:
        tp, cp, sp = layout["tp"], layout["cp"], layout["sp"]
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
        parallel = dict(tensor_parallel=tp, context_parallel=cp, sequence_parallel=sp)
        cfg = tiny_dit_config(parallel=parallel, version=ref["version"], **ref["overrides"])
        model = build_dit(cfg, inpaint_mask_channels=ref["inpaint"])
        dims = partition_dims(model)
        missing, unexpected = model.load_state_dict(shard_for_model(ref["state"], model), strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        ddp = _ddp(model)
        for case in ref["cases"]:
            ddp.zero_grad_buffer()
            out = ddp(**case["inputs"])
            loss = _loss(out, case["target"])
            (loss * cp).backward()  # each CP rank holds a share; DDP averages over (DP x CP)
            finalize_model_grads([ddp])
            worst = {"loss": (loss.detach() - case["loss"]).abs().item()}
            worst["out"] = (out.detach() - case["out"]).abs().max().item()
            worst["grad"] = _check_grads(
                layout, model, case["grads"], dims, tp, model.plan.tensor_parallel_group
            )
            assert worst["loss"] < 1e-5 and worst["out"] < 1e-5, (layout, worst)
            report.append((str(layout), worst))
        parallel_state.destroy_model_parallel()
    return report


def _pipeline_worker(rank, world_size, layouts, ref):
    """PP (and VPP) layouts: all batches as micro-batches of one step through Megatron's schedule."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from megatron_video.parallel.pipeline import build_model_chunks, run_pipeline_schedule
    from megatron_video.parallel.setup import build_parallel_plan
    from megatron_video.parallel.tensor_parallel_state import partition_dims
    from megatron_video.testing.distributed import init_megatron_parallel
    from megatron_video.testing.opensora_dit import shard_for_model

    report = []
    for layout in layouts:
        pp, vpp, tp, cp = layout["pp"], layout.get("vpp"), layout.get("tp", 1), layout.get("cp", 1)
        sp = layout.get("sp", False)
        init_megatron_parallel(tp=tp, pp=pp, cp=cp, vpp=vpp, seed=100 + rank)  # ranks seeded apart
        parallel = dict(
            pipeline_parallel=pp,
            virtual_pipeline=vpp,
            tensor_parallel=tp,
            context_parallel=cp,
            sequence_parallel=sp,
        )
        cfg = tiny_dit_config(parallel=parallel, version=ref["version"], **ref["overrides"])
        plan = build_parallel_plan(cfg)
        chunks = build_model_chunks(
            lambda blocks, cfg=cfg, plan=plan: build_dit(cfg, ref["inpaint"], blocks=blocks, plan=plan),
            cfg.model.num_layers,
        )
        dims = {}
        for chunk in chunks:
            dims.update(partition_dims(chunk))
            missing, _ = chunk.load_state_dict(shard_for_model(ref["state"], chunk), strict=False)
            assert all(k.endswith("_extra_state") for k in missing), missing
        ddp_chunks = [_ddp(chunk) for chunk in chunks]
        if not layout.get("cond_allreduce", True):
            plan.linear_config.has_cond_embedder = False

        def forward_step(data_iterator, chunk):
            case = next(data_iterator)
            out = chunk(**case["inputs"])
            if not chunk.module.post_process:
                return out, None
            loss = _loss(out, case["target"])
            # The schedule scales the returned loss by cp / micro-batches before backward.
            return loss, lambda o: (o, {"loss": o.detach().clone()})

        reports = run_pipeline_schedule(
            forward_step,
            ddp_chunks,
            [iter(ref["cases"]) for _ in ddp_chunks],
            len(ref["cases"]),
            2,
            torch.device("cpu"),
        )
        finalize_model_grads(ddp_chunks)
        worst = {}
        if reports:  # last stage: the losses of every micro-batch
            errs = [(r["loss"] - c["loss"]).abs().item() for r, c in zip(reports, ref["cases"])]
            worst["loss"] = max(errs)
            assert worst["loss"] < 1e-5, (layout, worst)
        if not layout.get("cond_allreduce", True):
            # Without the pipeline sum each chunk keeps its own share of the replicated gradients:
            # exactly those are wrong, on every rank.
            wrong = {
                n
                for c in chunks
                for n, p in c.named_parameters()
                if not torch.allclose(
                    _full_grad(n, p, dims, tp, None), ref["mean_grads"][n], rtol=1e-4, atol=1e-5
                )
            }
            assert wrong and all(n.startswith(REPLICATED) for n in wrong), wrong
            report.append((str(layout), {}, []))
            parallel_state.destroy_model_parallel()
            continue
        worst["grad"] = max(
            _check_grads(layout, chunk, ref["mean_grads"], dims, tp, plan.tensor_parallel_group)
            for chunk in chunks
        )
        # The replicated conditioning is on every chunk and equal to the reference on every one.
        for chunk in chunks:
            assert any(n.startswith("adaln_single.") for n, _ in chunk.named_parameters())
            assert any(n.startswith("caption_projection.") for n, _ in chunk.named_parameters())
        report.append((str(layout), worst, sorted(n for c in chunks for n, _ in c.named_parameters())))
        parallel_state.destroy_model_parallel()
    return report


TWO = [dict(tp=2, cp=1, sp=False), dict(tp=2, cp=1, sp=True), dict(tp=1, cp=2, sp=False)]
FOUR = [dict(tp=2, cp=2, sp=False), dict(tp=2, cp=2, sp=True)]
PIPELINE = [dict(pp=2), dict(pp=2, vpp=2), dict(pp=2, cond_allreduce=False)]
WORKERS = {"parallel": _parallel_worker, "pipeline": _pipeline_worker}


def _jobs_worker(rank, world_size, jobs):
    """Several (worker, layouts, reference) jobs in one launch: the start-up of the processes and of
    Megatron, not the tiny model, is what a launch costs."""
    return [WORKERS[kind](rank, world_size, layouts, ref) for kind, layouts, ref in jobs]


def _check_pipeline_report(ranks: list, job: int, ref: dict) -> None:
    """The chunks hold every parameter of the full model under the same names; the last stage logged losses."""
    for index in range(2):
        held = set().union(*(set(rank[job][index][2]) for rank in ranks))
        assert held == set(ref["state"]) - {k for k in ref["state"] if k.endswith("_extra_state")}
        assert any("loss" in rank[job][index][1] for rank in ranks)


def test_two_process_layouts(megatron_single):
    """One launch of 2 ranks: TP = 2, TP = 2 + SP and CP = 2 for every variant (v1.2 dense / v1.3
    Skiparse, T2V / I2V), then the pipeline layouts with 8 blocks (Skiparse on 2..5 for v1.3): PP = 2
    (blocks 0-3 | 4-7) and PP = 2 x VPP = 2 (chunks 0-1 | 2-3 | 4-5 | 6-7, rank 0 holds the first and
    third), every gradient equal to the single-process one, the replicated AdaLN-single's and caption
    projection's included; without Megatron's conditional-embedder all-reduce (`has_cond_embedder`)
    exactly those replicated gradients go wrong."""
    jobs = [("parallel", TWO, _reference(v, SHAPES_2)) for v in sorted(VARIANTS)]
    pipeline_refs = {v: _reference(v, SHAPES_2, num_layers=8) for v in sorted(VARIANTS)}
    jobs += [("pipeline", PIPELINE, ref) for ref in pipeline_refs.values()]
    ranks = run_distributed(_jobs_worker, 2, jobs, timeout_s=300)
    for job in range(len(VARIANTS)):
        assert len(ranks[0][job]) == len(TWO) * len(SHAPES_2)
    for job, ref in enumerate(pipeline_refs.values(), start=len(VARIANTS)):
        _check_pipeline_report(ranks, job, ref)


def test_four_process_layouts(megatron_single):
    """One launch of 4 ranks: TP = 2 x CP = 2 with and without SP for every variant, each variant on one
    of the two shapes (4 ranks share 2 cores here, so a batch costs seconds): both versions see 72
    tokens (not a multiple of k^2 = 16) in one task and 64 in the other."""
    shapes = {"v12_t2v": SHAPES_4[0], "v12_i2v": SHAPES_4[1], "v13_t2v": SHAPES_4[1], "v13_i2v": SHAPES_4[0]}
    jobs = [("parallel", FOUR, _reference(v, [shapes[v]])) for v in sorted(VARIANTS)]
    ranks = run_distributed(_jobs_worker, 4, jobs, timeout_s=300)
    assert all(len(report) == len(FOUR) for report in ranks[0])
