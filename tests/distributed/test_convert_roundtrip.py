"""tools/convert_checkpoint.py end to end: released layout -> our checkpoint (TP = 2) -> resharded
(PP = 2) -> flat export -> released layout, bitwise; the model output is checked at every step.

Weights and inputs are those of the `sparse_masked` golden case (tests/fixtures/open_sora_plan_v1_5),
whose `expected` output the released Open-Sora-Plan v1.5 code computed: the oracle every converted
model is held to (fp32, max abs <= 1e-5). The EMA comes from its own released file (other weights),
so raw and EMA exports are told apart.

One launch of two gloo ranks converts at TP = 2, runs the TP = 2 model from the checkpoint (raw and
EMA), and reshards the checkpoint to PP = 2 (with --out). This process then exports both
checkpoints (one process, TP = PP = 1), converts back to the released layout, and resumes the
TP = 2 checkpoint at TP = 1 the way a training stage does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from megatron_video.testing.distributed import run_distributed
from tests.unit.test_convert_checkpoint import keep_thread_count, load_tool  # noqa: F401 (a fixture)

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "open_sora_plan_v1_5"
CASE = "sparse_masked"
ATOL = 1e-5


def _write_stage_config(path: Path) -> Path:
    """A stage config of the golden case's model: fp32 on CPU, EMA kept, default optimizer."""
    case = json.loads((FIXTURES / "cases.json").read_text())[CASE]
    data = {
        "model": {"flavor": "tiny", **case["model"]},
        "runtime": {"device": "cpu", "dtype": "fp32", "attention_backend": "sdpa"},
        "shape": {"text_length": 8, "height": 64, "width": 64, "num_frames": 1},
        "training": {"ema_decay": 0.99},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _inputs_and_expected() -> tuple[dict, torch.Tensor]:
    data = load_file(FIXTURES / f"{CASE}.safetensors")
    return data, data.pop("expected")


def _output(model, ema=None) -> torch.Tensor:
    """The model's (or with `ema`, the EMA weights') output on the golden inputs."""
    inputs, _ = _inputs_and_expected()
    with torch.no_grad():
        if ema is None:
            return model(**inputs)
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        ema.copy_to(model)
        out = model(**inputs)
        for n, p in model.named_parameters():
            p.copy_(saved[n])
        return out


# -- inside the two workers -------------------------------------------------------------------------


def _worker(rank: int, world: int, paths: dict) -> dict:
    from megatron_video.config import load_config
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import init_distributed
    from megatron_video.testing.models import build_model
    from megatron_video.training import checkpoint as ckpt
    from megatron_video.training.ema import ParamEMA
    from megatron_video.training.loop import Trainer, wrap_ddp
    from megatron_video.training.rng import capture_rng_state
    from megatron_video.training.stage import build_denoiser

    tool, config = load_tool(), paths["config"]
    tp2, pp2 = ["parallel.tensor_parallel=2"], ["parallel.pipeline_parallel=2"]
    # 1. Released layout -> our checkpoint at TP = 2 (raw from model.pt, EMA from model_ema.pt).
    convert = ["osp-to-checkpoint", paths["osp"], paths["ckpt_tp2"], "--ema-src", paths["osp_ema"]]
    tool.main([*convert, "--config", config, *tp2])
    # 2. The TP = 2 model from that checkpoint, raw and EMA.
    cfg = load_config(config, tp2)
    model = build_model(cfg)
    ema = ParamEMA(model, 0.0)
    state = ckpt.load_checkpoint(paths["ckpt_tp2"], [wrap_ddp(model, model.plan, False)], ema=ema)
    out = {"step": state["step"], "raw": _output(model), "ema": _output(model, ema)}

    # 3. Reshard TP = 2 -> PP = 2 (model, EMA, optimizer, schedule), written for the new layout.
    tool.main(["reshard", paths["ckpt_tp2"], "--config", config, *pp2, "--out", paths["ckpt_pp2"]])
    out["rng_after_reshard"] = capture_rng_state()
    # Resuming the rewritten checkpoint at PP = 2 restores the random streams the reshard left.
    cfg = load_config(config, pp2)
    runtime = setup_parallel(cfg, init_distributed(cfg.runtime))
    trainer = Trainer(cfg, runtime, build_denoiser(cfg, runtime, "t2v"))
    state = ckpt.load_checkpoint(
        paths["ckpt_pp2"], trainer.model_chunks, trainer.optimizer, trainer.scheduler, trainer.ema
    )
    out["pp2_rng_restored"] = state["rng_restored"]
    out["rng_after_resume"] = capture_rng_state()
    out["pp2_meta"] = ckpt.read_checkpoint_metadata(paths["ckpt_pp2"])
    return out


# -- the test --------------------------------------------------------------------------------------


def _released(model, seed: int) -> dict:
    """Released-layout weights regenerated like the golden case (left in `model`, TP = 1)."""
    from megatron_video.models.suv.state_dict_adapter import to_open_sora_plan
    from megatron_video.testing.models import randomize

    return to_open_sora_plan(randomize(model, seed=seed), model.cfg)


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.usefixtures("keep_thread_count")
def test_released_to_tp2_checkpoint_to_pp2_to_flat_to_released(megatron_single, tmp_path):
    from megatron_video.config import load_config
    from megatron_video.errors import CheckpointMismatch
    from megatron_video.models.suv.state_dict_adapter import from_open_sora_plan
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.platform.launch import init_distributed
    from megatron_video.testing.models import build_model
    from megatron_video.training import checkpoint as ckpt
    from megatron_video.training.export import load_flat, load_full_into
    from megatron_video.training.loop import Trainer
    from megatron_video.training.stage import build_denoiser

    tool, config = load_tool(), _write_stage_config(tmp_path / "stage.yaml")
    cfg = load_config(config)
    seed = json.loads((FIXTURES / "cases.json").read_text())[CASE]["seed"]
    model = build_model(cfg)
    osp_ema = _released(model, seed + 1000)
    ref_ema = _output(model)
    osp = _released(model, seed)
    ref = _output(model)
    torch.save({"model": osp}, tmp_path / "model.pt")  # wrapped, as Megatron-era files are
    torch.save(osp_ema, tmp_path / "model_ema.pt")
    _, expected = _inputs_and_expected()
    assert _max_diff(ref, expected) <= ATOL  # the released weights in our TP = 1 model: the oracle

    paths = {
        "config": str(config),
        "osp": str(tmp_path / "model.pt"),
        "osp_ema": str(tmp_path / "model_ema.pt"),
        "ckpt_tp2": str(tmp_path / "ckpt_tp2"),
        "ckpt_pp2": str(tmp_path / "ckpt_pp2"),
    }
    ranks = run_distributed(_worker, 2, paths, timeout_s=180)

    # TP = 2 from our checkpoint: the released code's output, and the TP = 1 output on the same weights.
    for r in ranks:
        assert r["step"] == 0
        assert _max_diff(r["raw"], expected) <= ATOL and _max_diff(r["raw"], ref) <= ATOL
        assert _max_diff(r["ema"], ref_ema) <= ATOL
    # The rewritten checkpoint belongs to PP = 2: the layout record, and exact random streams.
    meta = ranks[0]["pp2_meta"]
    assert meta["iteration"] == 0 and meta["layout"]["pipeline_parallel"] == 2
    assert meta["layout"]["tensor_parallel"] == 1 and meta["has_ema"]
    for r in ranks:
        assert r["pp2_rng_restored"] is True
        assert torch.equal(r["rng_after_resume"]["torch_cpu"], r["rng_after_reshard"]["torch_cpu"])

    # Both checkpoints -> flat (one process, TP and PP merged) -> released layout: bitwise.
    flats = {}
    for name in ("ckpt_tp2", "ckpt_pp2"):
        for flag, source in (([], osp), (["--ema"], osp_ema)):
            flat = tmp_path / f"{name}{'_ema' if flag else ''}"
            tool.main(["checkpoint-to-flat", paths[name], str(flat), *flag])
            back = tmp_path / f"{flat.name}_osp.safetensors"
            tool.main(["flat-to-osp", str(flat.with_suffix(".safetensors")), str(back)])
            assert _same(tool.read_weights(back), source), (name, flag)
            flats[flat] = bool(flag)
    # A checkpoint loaded into another geometry: every tensor named with both shapes.
    with pytest.raises(
        CheckpointMismatch, match=r"shape: caption_projection.weight source \[32, 24\] vs model \[32, 32\]"
    ):
        tool.main(["checkpoint-to-flat", paths["ckpt_tp2"], str(tmp_path / "x"), "model.caption_channels=32"])

    # Resume the TP = 2 checkpoint at TP = 1 as a stage does: step 0, weights and EMA as released,
    # optimizer and schedule fresh (the random streams of two ranks cannot be restored on one).
    runtime = setup_parallel(cfg, init_distributed(cfg.runtime))
    trainer = Trainer(cfg, runtime, build_denoiser(cfg, runtime, "t2v"))
    state = ckpt.load_checkpoint(
        paths["ckpt_tp2"], trainer.model_chunks, trainer.optimizer, trainer.scheduler, trainer.ema
    )
    trainer.load_train_state(state)
    assert trainer.step == 0 and trainer.consumed_samples == 0 and state["data"] == {"consumed_samples": 0}
    assert state["rng_restored"] is False and trainer.scheduler.num_steps == 0
    weights = trainer.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in from_open_sora_plan(osp, cfg.model).items())
    assert _same(trainer.ema.shadow, from_open_sora_plan(osp_ema, cfg.model))
    adams = [part.optimizer for part in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])]
    moments = [t for adam in adams for per_param in adam.state.values() for t in per_param.values()]
    assert moments and all(torch.count_nonzero(t) == 0 for t in moments)  # exp_avg, exp_avg_sq, step
    assert _max_diff(_output(trainer.model), expected) <= ATOL

    # Each flat export in a TP = 1 model computes exactly what the released weights did.
    for flat, is_ema in flats.items():
        full, _ = load_flat(flat)
        load_full_into(trainer.model, runtime.plan, full)
        assert torch.equal(_output(trainer.model), ref_ema if is_ema else ref), flat.name
