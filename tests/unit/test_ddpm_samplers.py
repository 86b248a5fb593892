"""DDPM samplers against their formulas and against diffusers' schedulers (golden fixture)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_video.diffusion import DDPM_SAMPLERS, DDPMObjective, ddpm_sample
from megatron_video.diffusion.ddpm_samplers import ddpm_timesteps, euler_sigmas

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ddpm_samplers"


def toy_model_for(prediction: str, zero_terminal_snr: bool):
    """The fixed nonlinear denoiser of the fixture (see its README)."""
    alphas_bar = DDPMObjective(zero_terminal_snr=zero_terminal_snr).alphas_bar.float()

    def model(x, t_B):
        c = x.shape[1]
        w = torch.linspace(-1.0, 1.0, c, dtype=x.dtype, device=x.device).view(1, c, 1, 1, 1)
        s = (t_B.to(x.dtype) / 1000.0).view(-1, 1, 1, 1, 1)
        v = torch.tanh(0.8 * x + w) * (1.0 - 0.5 * s) + 0.3 * torch.sin(x * (1.0 + s))
        if prediction == "v_prediction":
            return v
        a = alphas_bar[t_B.round().long().clamp(0, 999)].to(x.device).view(-1, 1, 1, 1, 1)
        return (1 - a).sqrt() * x + a.sqrt() * v

    return model


def perfect_model_for(x0: torch.Tensor, objective: DDPMObjective):
    """The exact epsilon / v of a point-mass data distribution at `x0` (x_t = sqrt(a) x0 + sqrt(1 - a) eps)."""
    alphas_bar = objective.alphas_bar

    def model(x, t_B):
        a = alphas_bar[t_B.long()].float().view(-1, 1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if objective.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return model


# ---- timesteps and schedules -------------------------------------------------------------------


def test_trailing_timesteps_10_of_1000():
    assert ddpm_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]


def test_trailing_timesteps_that_do_not_divide():
    # round(arange(1000, 0, -1000 / 7)) - 1
    assert ddpm_timesteps(1000, 7, "trailing").tolist() == [999, 856, 713, 570, 428, 285, 142]
    # diffusers' float arange gives 62 values here (the last is -1); we keep the first 61
    t = ddpm_timesteps(1000, 61, "trailing")
    assert len(t) == 61 and t[0] == 999 and t[-1] >= 0


def test_leading_timesteps_and_offset():
    assert ddpm_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert ddpm_timesteps(1000, 10, "leading", steps_offset=1).tolist() == list(range(901, 0, -100))
    assert ddpm_timesteps(1000, 3, "leading").tolist() == [666, 333, 0]
    with pytest.raises(ValueError, match="past 999"):
        ddpm_timesteps(1000, 1000, "leading", steps_offset=1)


def test_zero_terminal_snr_schedule_and_euler_sigmas():
    zsnr = DDPMObjective(zero_terminal_snr=True)
    assert zsnr.alphas_bar[-1] == 0
    assert DDPMObjective(zero_terminal_snr=False).alphas_bar[-1] > 0
    sigmas = euler_sigmas(zsnr.alphas_bar, ddpm_timesteps(1000, 10, "trailing"), zero_terminal_snr=True)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (11,)
    assert sigmas[0].item() == pytest.approx(math.sqrt((1 - 2**-24) / 2**-24), rel=1e-6)  # ~4096
    assert sigmas[-1] == 0 and torch.all(sigmas[1:] < sigmas[:-1])
    a = zsnr.alphas_bar[899].item()
    assert sigmas[1].item() == pytest.approx(math.sqrt((1 - a) / a), rel=1e-5)


# ---- single steps in closed form -----------------------------------------------------------------


def test_one_ddim_step_equals_closed_form_x0():
    noise = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    pred = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    # v-prediction, zero terminal SNR, one trailing step: t = 999, alpha_bar 0, so x0 = -v
    v = DDPMObjective(prediction="v_prediction", zero_terminal_snr=True)
    out = ddpm_sample(lambda x, t: pred, noise, v, 1, "ddim")
    torch.testing.assert_close(out, -pred, rtol=0, atol=0)
    # epsilon, one leading step: t = 0, previous alpha_bar 1, so x0 = (x - sqrt(1 - a) eps) / sqrt(a)
    eps = DDPMObjective(prediction="epsilon", zero_terminal_snr=False)
    a = eps.alphas_bar[0].float()
    out = ddpm_sample(lambda x, t: pred, noise, eps, 1, "ddim")
    torch.testing.assert_close(out, (noise - (1 - a).sqrt() * pred) / a.sqrt(), rtol=0, atol=1e-6)


def test_one_euler_step_lands_on_predicted_x0():
    noise = torch.randn(1, 2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    pred = torch.randn(1, 2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    objective = DDPMObjective(prediction="v_prediction", zero_terminal_snr=True)
    seen = []

    def model(x, t):
        seen.append((x.clone(), t.clone()))
        return pred

    out = ddpm_sample(model, noise, objective, 1, "euler")
    s = math.sqrt((1 - 2**-24) / 2**-24)
    # state x = noise * s, model input x / sqrt(s^2 + 1), one step to sigma 0 gives the x0 prediction
    torch.testing.assert_close(seen[0][0], noise * s / math.sqrt(s * s + 1), rtol=1e-6, atol=1e-6)
    assert seen[0][1].tolist() == [999.0]
    expected = -s / math.sqrt(s * s + 1) * pred + noise * s / (s * s + 1)
    # the fp32 step x + (x - x0) / s (0 - s) cancels a state of size ~4096 |noise| (as in diffusers)
    torch.testing.assert_close(out, expected, rtol=0, atol=4096 * 2**-23 * 4)


@pytest.mark.parametrize("sampler", DDPM_SAMPLERS)
@pytest.mark.parametrize("prediction, zero_terminal_snr", [("v_prediction", True), ("epsilon", False)])
def test_perfect_model_recovers_its_data_point(sampler, prediction, zero_terminal_snr):
    objective = DDPMObjective(prediction=prediction, zero_terminal_snr=zero_terminal_snr)
    x0 = torch.randn(2, 2, 2, 3, 3, generator=torch.Generator().manual_seed(3)).clamp(-2, 2)
    noise = torch.randn(2, 2, 2, 3, 3, generator=torch.Generator().manual_seed(4))
    out = ddpm_sample(
        perfect_model_for(x0, objective), noise, objective, 20, sampler, torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


# ---- the sampling loop ---------------------------------------------------------------------------


def test_ancestral_noise_follows_the_generator():
    objective = DDPMObjective()
    model = toy_model_for("v_prediction", True)
    noise = torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(seed):
        return ddpm_sample(model, noise, objective, 8, "euler_ancestral", torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(7), run(7), rtol=0, atol=0)
    assert (run(7) - run(8)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="pass a torch.Generator"):
        ddpm_sample(model, noise, objective, 8, "euler_ancestral")


def test_model_dtype_progress_and_batch_timesteps():
    objective = DDPMObjective()
    calls, ticks = [], []

    def model(x, t):
        calls.append((x.dtype, t.dtype, t.shape))
        return torch.zeros_like(x)

    noise = torch.randn(3, 2, 1, 2, 2).to(torch.bfloat16)
    out = ddpm_sample(model, noise, objective, 4, "ddim", progress=lambda i, n: ticks.append((i, n)))
    assert out.dtype == torch.bfloat16
    assert calls == [(torch.bfloat16, torch.float32, (3,))] * 4
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_bad_names_and_invalid_combinations():
    noise = torch.zeros(1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="euler_ancestral, euler, ddim, ddpm"):
        ddpm_sample(lambda x, t: x, noise, DDPMObjective(), 4, "heun")
    with pytest.raises(ValueError, match="spacing"):
        ddpm_sample(lambda x, t: x, noise, DDPMObjective(), 4, "ddim", spacing="linspace")
    eps_zsnr = DDPMObjective(prediction="epsilon", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero-SNR"):
        ddpm_sample(lambda x, t: x, noise, eps_zsnr, 4, "ddim")


# ---- diffusers golden values ----------------------------------------------------------------------

CASES = json.loads((FIXTURE / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURE / "diffusers_reference.safetensors")


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_diffusers(name, reference):
    case = CASES[name]
    objective = DDPMObjective(prediction=case["prediction"], zero_terminal_snr=case["zero_terminal_snr"])
    timesteps = ddpm_timesteps(1000, case["steps"], case["spacing"], case["steps_offset"])
    assert timesteps.tolist() == reference[f"{name}.timesteps"].tolist()
    if f"{name}.sigmas" in reference:
        # alpha_bar from float64 (ours) vs fp32 (diffusers) cumprod: a few ulps apart
        sigmas = euler_sigmas(objective.alphas_bar, timesteps, case["zero_terminal_snr"])
        torch.testing.assert_close(sigmas, reference[f"{name}.sigmas"], rtol=2e-5, atol=1e-5)
    out = ddpm_sample(
        toy_model_for(case["prediction"], case["zero_terminal_snr"]),
        reference["noise"],
        objective,
        case["steps"],
        case["sampler"],
        torch.Generator().manual_seed(case["seed"]),
        spacing=case["spacing"],
        steps_offset=case["steps_offset"],
    )
    torch.testing.assert_close(out, reference[f"{name}.latents"], rtol=0, atol=1e-5)
