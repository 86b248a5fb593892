"""Checkpoints of a tiny SUV trained with Megatron DDP: exact resume, resharding, atomicity, EMA.

Three launches of two gloo ranks share the work (each launch costs seconds, each save about 3 s):

1. TP=1, DP=2: train N steps with the plain and with the distributed optimizer, saving at step K,
   then try a save at step N that fails before it is published.
2. TP=2, DP=1: load the TP=1 distributed-optimizer checkpoint (model, EMA, optimizer reshard; the
   random streams are reseeded) into the distributed and into the plain optimizer, continue 2
   steps; the plain run saves and continues 1 step; a model of another geometry is refused.
3. TP=1, DP=2 in fresh processes: load step K and train to N (losses, parameters, EMA and random
   streams bitwise equal to launch 1); reload K and continue like launch 2 (its reference); load
   launch 2's plain TP=2 checkpoint into the distributed optimizer (TP 2->1, DP 1->2); a last save
   removes the interrupted one's leftovers.

Steps that launch 1 and 3 compare bitwise draw noise and the flow shift from the global random
streams (torch, python, numpy), so they only match if those are restored. Steps that compare
across layouts draw per-sample noise from generators seeded by (step, sample), so the global batch
is the same however it is split over data-parallel ranks.
"""

from __future__ import annotations

import pytest
import torch

from megatron_video.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

MODEL = dict(caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
SEED = 1234
N_STEPS, SAVE_AT = 4, 2
GLOBAL_BATCH = 4
LATENT = dict(frames=1, height=8, width=8, text_len=8)


# -- Helpers that run inside the workers ----------------------------------------------------------


def _build(tp: int, kind: str, model_overrides: dict | None = None):
    """Tiny SUV + Megatron DDP + optimizer + scheduler + EMA over the initialised groups."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_video.testing.models import build_model, randomize, tiny_config
    from megatron_video.training.ema import ParamEMA

    cfg = tiny_config(parallel=dict(tensor_parallel=tp), **MODEL, **(model_overrides or {}))
    model = build_model(cfg)
    if tp == 1:
        randomize(model, seed=3)  # every path carries signal; TP=2 runs get weights from checkpoints
    distributed = kind == "dist"
    ddp = DistributedDataParallel(
        config=model.plan.linear_config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed
        ),
        module=model,
    )
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=1e-3,
        min_lr=1e-4,
        weight_decay=0.01,
        clip_grad=1.0,
        use_distributed_optimizer=distributed,
    )
    optimizer = get_megatron_optimizer(opt_cfg, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=1e-4,
        max_lr=1e-3,
        min_lr=1e-4,
        lr_warmup_steps=1,
        lr_decay_steps=10,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=10,
        wd_incr_style="constant",
    )
    return cfg, ddp, optimizer, scheduler, ParamEMA(model, decay=0.9)


def _samples(cfg, step: int):
    """This data-parallel rank's share of the global batch of `step`: x0, conditioning, indices."""
    from megatron.core import parallel_state

    from megatron_video.testing.models import random_inputs

    dp, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    per_rank = GLOBAL_BATCH // dp_size
    indices = list(range(dp * per_rank, (dp + 1) * per_rank))
    parts = [random_inputs(cfg, batch=1, **LATENT, seed=1000 * step + i, masks=False) for i in indices]
    x0 = torch.cat([p["latents_BCTHW"] for p in parts])
    cond = {k: torch.cat([p[k] for p in parts]) for k in ("text_BLC", "pooled_BP")}
    return x0, cond, indices


def _loss(cfg, ddp, step: int, noise: str) -> torch.Tensor:
    """Flow-matching loss of this rank's samples; noise from the global streams or per sample."""
    import random

    import numpy as np

    from megatron_video.diffusion import FlowMatching

    x0, cond, indices = _samples(cfg, step)
    if noise == "global":
        shift = 1.0 + 0.5 * random.random() + 0.5 * float(np.random.rand())
        return FlowMatching(shift=shift).training_loss(ddp, x0, cond, torch.default_generator)
    fm = FlowMatching(shift=1.0)
    gens = [torch.Generator().manual_seed(50_000 + 1000 * step + i) for i in indices]
    sigma = torch.cat([fm.sample_sigmas(1, x0.shape[-2:], g) for g in gens])
    noise_ = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in gens])
    pred = ddp(fm.noisy_input(x0, noise_, sigma), fm.timesteps(sigma), **cond)
    return ((pred - fm.target(x0, noise_, sigma)) ** 2).mean()


def _train_step(cfg, ddp, optimizer, scheduler, ema, step: int, noise: str) -> tuple[float, float]:
    """One optimizer step; returns (this rank's loss, the data-parallel mean loss)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = _loss(cfg, ddp, step, noise)
    loss.backward()
    finalize_model_grads([ddp])
    optimizer.step()
    scheduler.step(increment=1)
    ema.update(ddp.module)
    mean = loss.detach().clone()
    torch.distributed.all_reduce(mean, group=parallel_state.get_data_parallel_group())
    return loss.item(), mean.item() / parallel_state.get_data_parallel_world_size()


def _outputs(cfg, ddp, ema) -> dict[str, torch.Tensor]:
    """Model and EMA-model velocity on a fixed batch (full tensors on every rank)."""
    from megatron_video.testing.models import random_inputs

    inputs = random_inputs(cfg, batch=2, **LATENT, seed=77)
    model = ddp.module
    with torch.no_grad():
        out = model(**inputs)
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        ema.copy_to(model)
        out_ema = model(**inputs)
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return {"model": out, "ema": out_ema}


def _snapshot(ddp, ema) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in ddp.module.named_parameters()},
        "ema": {n: t.clone() for n, t in ema.shadow.items()},
    }


def _train_state(cfg, step: int) -> dict:
    return {
        "step": step,
        "consumed_samples": step * GLOBAL_BATCH,
        "skipped_steps": 0,
        "seed": SEED,
        "config": cfg,
    }


def _seed_rank() -> None:
    """Different streams per rank, so that a rank mix-up in the RNG checkpoint would show."""
    import random

    import numpy as np

    rank = torch.distributed.get_rank()
    random.seed(SEED + rank)
    np.random.seed(SEED + rank)
    torch.manual_seed(SEED + rank)


# -- The three launches ---------------------------------------------------------------------------


def _launch_train(rank, world_size, dirs):
    """TP=1, DP=2: uninterrupted runs that save at SAVE_AT; a save at N_STEPS interrupted."""
    from megatron_video.testing.distributed import init_megatron_parallel
    from megatron_video.training import checkpoint
    from megatron_video.training.checkpoint_files import latest_checkpoint
    from megatron_video.training.rng import capture_rng_state

    init_megatron_parallel(tp=1, seed=SEED)
    result = {}
    for kind in ("plain", "dist"):
        _seed_rank()
        cfg, ddp, optimizer, scheduler, ema = _build(1, kind)
        losses, rng_at_save = [], None
        for step in range(N_STEPS):
            if step == SAVE_AT:
                checkpoint.save_checkpoint(
                    dirs[kind], step, [ddp], optimizer, scheduler, _train_state(cfg, step), ema=ema
                )
                rng_at_save = capture_rng_state()
            losses.append(_train_step(cfg, ddp, optimizer, scheduler, ema, step, "global")[0])
        result[kind] = dict(losses=losses, rng_at_save=rng_at_save, **_snapshot(ddp, ema))

    # A save that fails between writing its temp directory and publishing it.
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before publishing")

    original, checkpoint._publish = checkpoint._publish, crash
    try:
        checkpoint.save_checkpoint(
            dirs["dist"], N_STEPS, [ddp], optimizer, scheduler, _train_state(cfg, N_STEPS)
        )
        result["interrupted"] = "save did not fail"
    except RuntimeError as exc:
        result["interrupted"] = str(exc)
    finally:
        checkpoint._publish = original
    result["after_crash"] = {
        "latest": latest_checkpoint(dirs["dist"]).name,
        "pointer": (dirs["dist"] / "latest").read_text().strip(),
        "entries": sorted(p.name for p in dirs["dist"].iterdir()),
    }
    result["meta"] = checkpoint.read_checkpoint_metadata(dirs["dist"])
    torch.distributed.barrier()
    if rank == 0:  # what a save killed mid-write (SIGKILL: no clean-up) leaves behind
        (dirs["dist"] / "iter_0000004.tmp-killed").mkdir()
        (dirs["dist"] / "iter_0000004.tmp-killed" / "__0_0.distcp").write_bytes(b"partial")
    return result


def _launch_tp2(rank, world_size, dirs):
    """TP=2, DP=1: load the TP=1 checkpoint with either optimizer, continue, save; refuse a geometry."""
    from megatron_video.testing.distributed import init_megatron_parallel
    from megatron_video.testing.models import build_model, tiny_config
    from megatron_video.training import checkpoint

    init_megatron_parallel(tp=2, seed=SEED)
    result = {}
    other = build_model(tiny_config(parallel=dict(tensor_parallel=2), **MODEL, head_dim=32))
    try:
        checkpoint.load_checkpoint(dirs["dist"], [other])
        result["mismatch"] = "loaded"
    except checkpoint.CheckpointMismatchError as exc:
        result["mismatch"] = str(exc)

    # The distributed optimizer resharded (TP 1 -> 2, DP 2 -> 1), and converted to the plain one
    # (what a run that switches the distributed optimizer off at DP = 1 gets).
    for kind in ("dist", "plain"):
        cfg, ddp, optimizer, scheduler, ema = _build(2, kind)
        state = checkpoint.load_checkpoint(dirs["dist"], [ddp], optimizer, scheduler, ema=ema)
        result[kind] = {
            "train_state": {k: v for k, v in state.items() if k != "config"},
            "outputs": _outputs(cfg, ddp, ema),
            "losses": [
                _train_step(cfg, ddp, optimizer, scheduler, ema, step, "per_sample")[1]
                for step in range(SAVE_AT, SAVE_AT + 2)
            ],
        }
    checkpoint.save_checkpoint(
        dirs["tp2"], SAVE_AT + 2, [ddp], optimizer, scheduler, _train_state(cfg, SAVE_AT + 2), ema=ema
    )
    result["next_loss"] = _train_step(cfg, ddp, optimizer, scheduler, ema, SAVE_AT + 2, "per_sample")[1]
    return result


def _launch_resume(rank, world_size, dirs):
    """TP=1, DP=2, fresh processes: exact resume, the TP=1 reference for launch 2, TP=2 -> TP=1."""
    from megatron_video.testing.distributed import init_megatron_parallel
    from megatron_video.training import checkpoint
    from megatron_video.training.checkpoint_files import latest_checkpoint
    from megatron_video.training.rng import capture_rng_state

    init_megatron_parallel(tp=1, seed=SEED + 99)  # seeds differ from launch 1: the load must restore them
    result = {}
    for kind in ("plain", "dist"):
        cfg, ddp, optimizer, scheduler, ema = _build(1, kind)
        state = checkpoint.load_checkpoint(dirs[kind], [ddp], optimizer, scheduler, ema=ema)
        rng = capture_rng_state()
        losses = [
            _train_step(cfg, ddp, optimizer, scheduler, ema, step, "global")[0]
            for step in range(state["step"], N_STEPS)
        ]
        result[kind] = dict(
            train_state={k: v for k, v in state.items() if k != "config"},
            config=state["config"],
            rng_after_load=rng,
            losses=losses,
            **_snapshot(ddp, ema),
        )

    # The TP=1 continuation launch 2 is compared with, then launch 2's TP=2 checkpoint loaded here.
    checkpoint.load_checkpoint(dirs["dist"], [ddp], optimizer, scheduler, ema=ema, iteration=SAVE_AT)
    result["outputs"] = _outputs(cfg, ddp, ema)
    result["losses_b"] = [
        _train_step(cfg, ddp, optimizer, scheduler, ema, step, "per_sample")[1]
        for step in range(SAVE_AT, SAVE_AT + 2)
    ]
    state = checkpoint.load_checkpoint(dirs["tp2"], [ddp], optimizer, scheduler, ema=ema)
    result["from_tp2"] = {
        "train_state": {k: v for k, v in state.items() if k != "config"},
        "next_loss": _train_step(cfg, ddp, optimizer, scheduler, ema, SAVE_AT + 2, "per_sample")[1],
    }

    # The next successful save removes the interrupted save's leftovers and prunes.
    checkpoint.save_checkpoint(
        dirs["dist"], N_STEPS, [ddp], optimizer, scheduler, _train_state(cfg, N_STEPS), keep_last=1
    )
    result["after_save"] = {
        "latest": latest_checkpoint(dirs["dist"]).name,
        "entries": sorted(p.name for p in dirs["dist"].iterdir()),
    }
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    dirs = {name: root / name for name in ("plain", "dist", "tp2")}
    train = run_distributed(_launch_train, 2, dirs, timeout_s=400)
    tp2 = run_distributed(_launch_tp2, 2, dirs, timeout_s=400)
    resume = run_distributed(_launch_resume, 2, dirs, timeout_s=400)
    return train, tp2, resume


# -- Checks ---------------------------------------------------------------------------------------


def _same_rng(a: dict, b: dict) -> bool:
    import numpy as np

    same_numpy = all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a["numpy"], b["numpy"])
    )
    return (
        a["python"] == b["python"]
        and same_numpy
        and torch.equal(a["torch_cpu"], b["torch_cpu"])
        and torch.equal(a["device"], b["device"])
        and a["tracker"].keys() == b["tracker"].keys()
        and all(torch.equal(a["tracker"][k], b["tracker"][k]) for k in a["tracker"])
    )


@pytest.mark.parametrize("kind", ["plain", "dist"])
def test_resume_is_bitwise_exact(runs, kind):
    """(a) Losses, parameters, EMA and random streams after a resume equal the uninterrupted run."""
    train, _, resume = runs
    for rank in range(2):
        before, after = train[rank][kind], resume[rank][kind]
        assert after["train_state"]["step"] == SAVE_AT and after["train_state"]["rng_restored"] is True
        assert _same_rng(before["rng_at_save"], after["rng_after_load"]), f"rank {rank}: RNG not restored"
        assert after["losses"] == before["losses"][SAVE_AT:], (rank, before["losses"], after["losses"])
        for name, p in before["params"].items():
            assert torch.equal(p, after["params"][name]), f"rank {rank}: parameter {name} differs"
        for name, t in before["ema"].items():
            assert torch.equal(t, after["ema"][name]), f"rank {rank}: EMA {name} differs"
    # The ranks start from different streams (and data), so a rank mix-up would show.
    assert train[0][kind]["losses"] != train[1][kind]["losses"]
    assert resume[0][kind]["config"].model.num_heads == 4  # the config snapshot comes back as saved


@pytest.mark.parametrize("kind", ["dist", "plain"])
def test_tp1_checkpoint_loads_at_tp2(runs, kind):
    """(b) TP=1 -> TP=2 (DP 2 -> 1): same outputs and EMA outputs; the optimizer state continues.

    `plain`: the distributed optimizer's checkpoint is loaded into the non-distributed one.
    """
    _, tp2, resume = runs
    reference = resume[0]
    for rank in range(2):
        got = tp2[rank][kind]
        assert got["train_state"]["rng_restored"] is False
        assert got["train_state"]["rng_reseeded_from"] == {"seed": SEED, "iteration": SAVE_AT}
        for key in ("model", "ema"):
            diff = (got["outputs"][key] - reference["outputs"][key]).abs().max().item()
            assert diff <= 1e-6, f"{key} output differs by {diff:.2e} at TP=2"
        # The second loss follows an update made with the loaded Adam moments, step and lr.
        for a, b in zip(got["losses"], reference["losses_b"]):
            assert abs(a - b) <= 1e-5, (got["losses"], reference["losses_b"])
    assert not torch.equal(tp2[0][kind]["outputs"]["model"], tp2[0][kind]["outputs"]["ema"])


def test_tp2_checkpoint_loads_at_tp1(runs):
    """(b) TP=2 -> TP=1 (DP 1 -> 2), the plain optimizer's checkpoint into the distributed one."""
    _, tp2, resume = runs
    for rank in range(2):
        got = resume[rank]["from_tp2"]
        assert got["train_state"]["step"] == SAVE_AT + 2 and got["train_state"]["rng_restored"] is False
        assert abs(got["next_loss"] - tp2[0]["next_loss"]) <= 1e-5, (got["next_loss"], tp2[0]["next_loss"])


def test_interrupted_save_leaves_previous_checkpoint(runs):
    """(c) A save that fails before publishing raises on every rank, removes its partial folder and
    leaves `latest` on the previous checkpoint; the next save removes what a killed save left."""
    train, _, resume = runs
    assert "simulated crash" in train[0]["interrupted"]
    assert "another rank failed while saving" in train[1]["interrupted"]
    after = train[0]["after_crash"]
    assert after["latest"] == "iter_0000002" and after["pointer"] == str(SAVE_AT)
    # The failed save removed its partial folder; only the previous checkpoint is there.
    assert after["entries"] == ["iter_0000002", "latest"]
    # Launch 3 resumed from iteration 2 (checked above); its save cleaned up and pruned.
    assert resume[0]["after_save"] == {"latest": "iter_0000004", "entries": ["iter_0000004", "latest"]}


def test_metadata_records_layout_and_config(runs):
    train, _, _ = runs
    meta = train[0]["meta"]
    assert meta["iteration"] == SAVE_AT
    assert meta["layout"]["tensor_parallel"] == 1 and meta["layout"]["data_parallel"] == 2
    assert meta["optimizer"]["distributed"] is True
    assert meta["has_ema"] is True
    assert meta["config"]["model"]["num_heads"] == 4


def test_geometry_mismatch_names_the_field(runs):
    """(e) A model of another geometry is refused with the differing field named."""
    _, tp2, _ = runs
    message = tp2[0]["mismatch"]
    assert "model.head_dim: checkpoint 16, current 32" in message, message
