"""tools/convert_checkpoint.py for the v1.2 / v1.3 DiT family: released diffusers folder -> our
checkpoint (TP = 2) -> resharded (PP = 2) -> flat export -> released folder, bitwise; the model output
is held to the released code's golden output at every step.

Weights and inputs are those of the `v13_i2v` golden case (tests/fixtures/open_sora_plan_v12_v13: an
I2V model with Skiparse k = 4), whose `expected` output the released v1.3 code computed (fp32, max abs
<= 1e-5). The EMA comes from its own released folder (other weights), so raw and EMA are told apart.
One launch of two gloo ranks converts at TP = 2, runs the TP = 2 model from the checkpoint, and
reshards it to PP = 2; this process exports both checkpoints and converts them back.
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
FIXTURES = ROOT / "tests" / "fixtures" / "open_sora_plan_v12_v13"
CASE = "v13_i2v"
ATOL = 1e-5


def _case() -> dict:
    return json.loads((FIXTURES / "cases.json").read_text())[CASE]


def _write_stage_config(path: Path) -> Path:
    """A stage config of the golden case's model: fp32 on CPU, EMA kept, WF-VAE 4x8x8 (mask width 4)."""
    data = {
        "model": {"family": "opensora_dit", "flavor": "tiny", **_case()["model"]},
        "runtime": {"device": "cpu", "dtype": "fp32", "attention_backend": "sdpa"},
        "vae": {"flavor": "wfvae_4x8x8_d8"},
        "shape": {"text_length": 8, "height": 64, "width": 64, "num_frames": 1},
        "training": {"ema_decay": 0.99, "objective": {"kind": "v_prediction"}},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _inputs_and_expected() -> tuple[dict, torch.Tensor]:
    data = load_file(FIXTURES / f"{CASE}.safetensors")
    return data, data.pop("expected")


def _output(model) -> torch.Tensor:
    inputs, _ = _inputs_and_expected()
    with torch.no_grad():
        return model(**inputs)


def _worker(rank: int, world: int, paths: dict) -> dict:
    from megatron_video.config import load_config
    from megatron_video.testing.opensora_dit import build_dit
    from megatron_video.training import checkpoint as ckpt
    from megatron_video.training.ema import ParamEMA
    from megatron_video.training.loop import wrap_ddp

    tool, config = load_tool(), paths["config"]
    tp2 = ["parallel.tensor_parallel=2", "--task", "i2v"]
    convert = [
        "dit-folder-to-checkpoint",
        paths["folder"],
        paths["ckpt_tp2"],
        "--ema-src",
        paths["folder_ema"],
    ]
    tool.main([*convert, "--config", config, *tp2])
    model = build_dit(load_config(config, tp2[:1]), inpaint_mask_channels=4)
    ema = ParamEMA(model, 0.0)
    state = ckpt.load_checkpoint(paths["ckpt_tp2"], [wrap_ddp(model, model.plan, False)], ema=ema)
    out = {"step": state["step"], "raw": _output(model)}
    ema.copy_to(model)
    out["ema"] = _output(model)
    pp2 = ["parallel.pipeline_parallel=2", "--task", "i2v"]
    tool.main(["reshard", paths["ckpt_tp2"], "--config", config, *pp2, "--out", paths["ckpt_pp2"]])
    out["pp2_layout"] = ckpt.read_checkpoint_metadata(paths["ckpt_pp2"])["layout"]
    return out


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("keep_thread_count")
def test_released_folder_to_tp2_to_pp2_to_flat_to_released_folder(megatron_single, tmp_path):
    from megatron_video.config import load_config
    from megatron_video.errors import CheckpointMismatch
    from megatron_video.models.opensora_dit.state_dict_adapter import save_open_sora_plan_folder
    from megatron_video.models.wfvae.state_dict_adapter import read_folder
    from megatron_video.testing.models import randomize
    from megatron_video.testing.opensora_dit import build_dit

    tool, config = load_tool(), _write_stage_config(tmp_path / "stage.yaml")
    cfg = load_config(config)
    case, model = _case(), build_dit(cfg, inpaint_mask_channels=4)
    ema_state = randomize(model, seed=case["seed"] + 1000, std=case["std"])
    ref_ema = _output(model)
    state = randomize(model, seed=case["seed"], std=case["std"])
    _, expected = _inputs_and_expected()
    assert (_output(model) - expected).abs().max().item() <= ATOL  # our TP = 1 model: the oracle
    folders = {"folder": tmp_path / "released", "folder_ema": tmp_path / "released_ema"}
    save_open_sora_plan_folder(folders["folder"], state, cfg.model, 4)
    save_open_sora_plan_folder(folders["folder_ema"], ema_state, cfg.model, 4)

    paths = {
        "config": str(config),
        **{k: str(v) for k, v in folders.items()},
        "ckpt_tp2": str(tmp_path / "ckpt_tp2"),
        "ckpt_pp2": str(tmp_path / "ckpt_pp2"),
    }
    ranks = run_distributed(_worker, 2, paths, timeout_s=180)
    for r in ranks:
        assert r["step"] == 0
        assert (r["raw"] - expected).abs().max().item() <= ATOL
        assert (r["ema"] - ref_ema).abs().max().item() <= ATOL
    assert (ranks[0]["pp2_layout"]["pipeline_parallel"], ranks[0]["pp2_layout"]["tensor_parallel"]) == (2, 1)

    # Both checkpoints -> flat (TP and PP merged) -> released folder: the tensors bitwise, the config the same.
    for name in ("ckpt_tp2", "ckpt_pp2"):
        for flag, folder in (([], folders["folder"]), (["--ema"], folders["folder_ema"])):
            flat = tmp_path / f"{name}{'_ema' if flag else ''}"
            tool.main(
                [
                    "checkpoint-to-flat",
                    paths[name],
                    str(flat),
                    "--task",
                    "i2v",
                    "--config",
                    str(config),
                    *flag,
                ]
            )
            assert json.loads(flat.with_suffix(".json").read_text())["family"] == "opensora_dit"
            back = tmp_path / f"{flat.name}_released"
            tool.main(["dit-flat-to-folder", str(flat.with_suffix(".safetensors")), str(back)])
            (orig_cfg, orig), (back_cfg, weights) = read_folder(folder), read_folder(back)
            assert _same(weights, orig) and back_cfg == orig_cfg, (name, flag)
            flat_model = build_dit(cfg, inpaint_mask_channels=4)
            flat_model.load_state_dict(load_file(flat.with_suffix(".safetensors")), strict=False)
            assert torch.equal(_output(flat_model), _output(model) if not flag else ref_ema)
    # The folder <-> flat commands alone, and a folder that does not fit: every key named.
    tool.main(["dit-folder-to-flat", str(folders["folder"]), str(tmp_path / "direct")])
    tool.main(["dit-flat-to-folder", str(tmp_path / "direct.safetensors"), str(tmp_path / "direct_back")])
    assert _same(read_folder(tmp_path / "direct_back")[1], read_folder(folders["folder"])[1])
    broken = tmp_path / "broken"
    released_cfg, weights = read_folder(folders["folder"])
    weights["transformer_blocks.9.attn1.to_q.weight"] = weights.pop("transformer_blocks.5.attn1.to_q.weight")
    from megatron_video.models.wfvae.state_dict_adapter import write_folder

    write_folder(broken, released_cfg, weights)
    with pytest.raises(CheckpointMismatch) as mismatch:
        tool.main(["dit-folder-to-flat", str(broken), str(tmp_path / "x")])
    assert "missing: ['transformer_blocks.5.attn1.to_q.weight']" in str(mismatch.value)
    assert "'transformer_blocks.9.attn1.to_q.weight'" in str(mismatch.value).split("unexpected:")[1]
