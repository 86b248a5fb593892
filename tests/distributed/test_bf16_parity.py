"""runtime.dtype=bf16 under DP + distributed optimizer, TP + SP, Ulysses CP and PP against one process.

Trainer steps from the same weights on the same global batches and noise. The reference is the
bf16 Trainer in the test process (DP = 1; bf16 always runs Megatron's distributed optimizer); an fp32 reference run
sizes what bf16 round-off alone does.

* DP = 2 with the distributed optimizer, and PP = 2: every matmul sees what it sees in one process
  (PP exchanges the fp32 residual streams, `pipeline_dtype` fp32), and gradients are reduced and
  the fp32 main parameters updated in fp32, so losses, gradients (PP; under the distributed
  optimizer, whose gradient buffers hold only each rank's shard, their norm) and the main
  parameters (gathered from their shards) match to fp32 round-off: rtol 1e-4 / atol 1e-5.
  Measured: 0 for the losses, 8e-10 / 5e-9 relative L2 for the main parameters.
* TP = 2 + SP and CP = 2: the bf16 matmuls are split differently (a row-parallel output is a bf16
  sum of two bf16 partial products), so results differ by bf16 round-off: losses within rel 5e-3,
  gradients (all parameters, TP shards merged; under CP, whose ranks hold distributed-optimizer
  shards of the gradient buffer, the global gradient norm) within relative L2 3e-2 and within 3x the one-process
  bf16 vs fp32 difference, main parameters after two AdamW steps within 3x that difference.
  Measured: loss 8e-5 / 4e-5, gradients 3.8e-3 / 3.3e-3 (bf16 vs fp32: 5.0e-3), main parameters
  1.2e-3 / 4.4e-4 (bf16 vs fp32: 1.7e-3).
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.testing.distributed import run_distributed
from megatron_video.testing.models import randomize, tiny_config

pytestmark = pytest.mark.distributed

MODEL = dict(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
STEPS = 2
GLOBAL_BATCH = 2
LAYOUTS = [
    dict(dp=2),
    dict(tp=2, sp=True),
    dict(cp=2),
    dict(pp=2),
]


def _config(dtype: str, parallel: dict | None = None):
    cfg = tiny_config(parallel=parallel, **MODEL)
    cfg.runtime.dtype = dtype
    t = cfg.training
    t.global_batch_size, t.micro_batch_size = GLOBAL_BATCH, 1
    t.optimizer.lr, t.optimizer.warmup_steps, t.ema_decay = 1e-3, 0, 0.9
    return cfg


class _FixedBatches:
    """Sample p of step s is a fixed random tensor (text and video masks included)."""

    def __init__(self, cfg, dp_rank: int, accumulation: int):
        self.cfg, self.dp_rank, self.accumulation = cfg, dp_rank, accumulation
        self.step = self.micro = 0

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
        cond["video_mask_BTHW"][0, 1, : pos + 1] = 0
        self.micro += 1
        if self.micro == self.accumulation:
            self.micro, self.step = 0, self.step + 1
        return TrainBatch(x0, cond, cond["video_mask_BTHW"].clone())


def _run(cfg, runtime, state) -> dict:
    """STEPS Trainer steps from `state`: losses, full gradients per step, full fp32 main parameters."""
    import torch.distributed as dist

    from megatron_video.models.suv.model import SUVModel
    from megatron_video.parallel.pipeline import build_model_chunks
    from megatron_video.parallel.tensor_parallel_state import partition_dims, shard_state_dict
    from megatron_video.training.export import main_params
    from megatron_video.training.loop import Trainer

    plan = runtime.plan
    if runtime.pipeline_parallel > 1:
        chunks = build_model_chunks(lambda b: SUVModel(cfg.model, plan, blocks=b), cfg.model.total_layers)
    else:
        chunks = [SUVModel(cfg.model, plan)]
    dims = {}
    for chunk in chunks:
        dims.update(partition_dims(chunk))
        own = {k: v for k, v in state.items() if k in chunk.state_dict()}
        chunk.load_state_dict(
            shard_state_dict(own, dims, plan.tensor_parallel_rank, plan.tensor_parallel), strict=False
        )
    trainer = Trainer(cfg, runtime, chunks if runtime.pipeline_parallel > 1 else chunks[0])

    def full(tensors):
        out = {}
        for name, t in tensors.items():
            if name in dims and plan.tensor_parallel > 1:
                parts = [torch.empty_like(t) for _ in range(plan.tensor_parallel)]
                dist.all_gather(parts, t.contiguous(), group=plan.tensor_parallel_group)
                t = torch.cat(parts, dim=dims[name])
            out[name] = t.detach().float().clone()
        return out

    grads = []
    trainer.before_optimizer_step = lambda tr: grads.append(
        {k: v for c in chunks for k, v in full({n: p.main_grad for n, p in c.named_parameters()}).items()}
    )
    source = _FixedBatches(cfg, runtime.data_parallel_rank, trainer.accumulation)
    metrics = [trainer.train_step(source) for _ in range(STEPS)]
    trainer.sync_params()  # fp32 parameters are their own main parameters: current values
    mains = {k: v for c in chunks for k, v in full(main_params(c, trainer.optimizer)).items()}
    kinds = sorted(
        {type(p).__name__ for p in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])}
    )
    losses, grad_norms = [m["loss"] for m in metrics], [m["grad_norm"] for m in metrics]
    return dict(losses=losses, grad_norms=grad_norms, grads=grads, mains=mains, optimizer=kinds)


def _worker(rank, world_size, state):
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import Runtime
    from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation

    apply_megatron_cpu_adaptation()
    results = []
    for layout in LAYOUTS:
        parallel = dict(
            tensor_parallel=layout.get("tp", 1),
            sequence_parallel=layout.get("sp", False),
            context_parallel=layout.get("cp", 1),
            pipeline_parallel=layout.get("pp", 1),
        )
        cfg = _config("bf16", parallel)
        runtime = setup_parallel(cfg, Runtime(torch.device("cpu"), rank, world_size, rank))
        results.append(_run(cfg, runtime, state))
    return results


def _reference(dtype: str, state: dict) -> dict:
    from megatron_video.parallel.setup import build_parallel_plan
    from megatron_video.platform.launch import Runtime

    cfg = _config(dtype)
    return _run(cfg, Runtime(torch.device("cpu"), 0, 1, 0, plan=build_parallel_plan(cfg)), state)


def _relative(run: dict, ref: dict) -> float:
    """Relative L2 difference of two name -> tensor dicts over the names of `run`."""
    names = sorted(run)
    a = torch.cat([run[n].flatten() for n in names])
    b = torch.cat([ref[n].flatten() for n in names])
    return ((a - b).norm() / b.norm()).item()


def test_bf16_parallel_layouts_match_one_process(megatron_single):
    from megatron_video.testing.models import build_model

    state = randomize(build_model(_config("fp32")), seed=5, std=0.05)
    ref = _reference("bf16", state)
    ref32 = _reference("fp32", state)
    # What bf16 round-off alone does in one process.
    grad_bf16 = max(_relative(ref["grads"][s], ref32["grads"][s]) for s in range(STEPS))
    main_bf16 = _relative(ref["mains"], ref32["mains"])
    assert 1e-4 < grad_bf16 < 2e-2, grad_bf16  # bf16 is in use, and close to fp32

    ranks = run_distributed(_worker, 2, state, timeout_s=500)
    report = {"bf16 vs fp32": dict(grad=grad_bf16, main=main_bf16)}
    for index, layout in enumerate(LAYOUTS):
        for rank, rank_results in enumerate(ranks):
            run = rank_results[index]
            loss_err = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], ref["losses"]))
            main_err = _relative(run["mains"], ref["mains"])
            report[f"{layout} rank {rank}"] = dict(loss=loss_err, main=main_err)
            if layout.get("dp") or layout.get("pp"):
                # The one-process matmuls, fp32 reductions and main parameters: fp32 round-off.
                assert run["optimizer"] == ["DistributedOptimizer"], run["optimizer"]
                assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5)
                assert run["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-4)
                if layout.get("pp"):
                    for s in range(STEPS):
                        for name, g in run["grads"][s].items():
                            torch.testing.assert_close(g, ref["grads"][s][name], rtol=1e-4, atol=1e-5)
                for name, p in run["mains"].items():
                    torch.testing.assert_close(p, ref["mains"][name], rtol=1e-4, atol=1e-5)
                continue
            if layout.get("cp"):
                # The distributed optimizer shards over DP x CP: each CP rank's gradient buffer holds
                # only its reduced shard, so the global gradient norm is compared instead.
                grad_err = max(abs(a - b) / b for a, b in zip(run["grad_norms"], ref["grad_norms"]))
            else:
                grad_err = max(_relative(run["grads"][s], ref["grads"][s]) for s in range(STEPS))
            report[f"{layout} rank {rank}"]["grad"] = grad_err
            assert loss_err < 5e-3, report
            assert grad_err < 3e-2 and grad_err < 3 * grad_bf16, report
            assert main_err < 3 * main_bf16, report
    for name, values in report.items():
        print(name, {k: f"{v:.1e}" for k, v in values.items()})
