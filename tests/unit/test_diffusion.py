"""Objectives and samplers against their formulas and the reference's numbers."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_video.diffusion import (
    DDPMObjective,
    FlowMatching,
    flow_sigmas,
    guided_velocity,
    resolution_shift,
)
from megatron_video.diffusion.ddpm import linear_betas, rescale_zero_terminal_snr
from megatron_video.diffusion.samplers import euler_flow_sample, linear_quadratic_sigmas


@pytest.mark.parametrize(
    "pixels, expected",
    [((256, 256), 1.6487), ((480, 640), 1.9344), ((576, 1024), 2.3319), ((720, 1280), 2.9039)],
)
def test_resolution_shift_matches_reference(pixels, expected):
    h, w = pixels
    assert resolution_shift(h // 8, w // 8) == pytest.approx(expected, abs=1e-4)


def test_inference_sigmas_shift_7():
    expected = [1, 0.984375, 0.965517, 0.942308, 0.913043, 0.875, 0.823529, 0.75, 0.636364, 0.4375, 0]
    torch.testing.assert_close(flow_sigmas(10, shift=7.0), torch.tensor(expected), atol=1e-6, rtol=0)


def test_linear_quadratic_schedule_endpoints_and_continuity():
    s = linear_quadratic_sigmas(50)
    assert s.shape == (51,) and s[0] == 1 and s[-1] == 0
    assert torch.all(s[1:] <= s[:-1])
    m = 500  # M = min(max(10 * 50, 250), 1000)
    assert s[25].item() == pytest.approx(1 - 25 / m, abs=1e-6)
    with pytest.raises(ValueError, match="even"):
        linear_quadratic_sigmas(7)


class _Recorder(torch.nn.Module):
    """A 'model' that returns a fixed linear function of its input and records what it saw."""

    def forward(self, x, t, **cond):
        self.x, self.t = x, t
        return 0.5 * x


def test_flow_matching_loss_formula():
    obj = FlowMatching(shift=3.0)
    x0 = torch.randn(3, 2, 2, 4, 4)
    gen = torch.Generator().manual_seed(0)
    model = _Recorder()
    loss = obj.training_loss(model, x0, {}, gen)
    # Redraw the same sigma and noise by hand.
    gen = torch.Generator().manual_seed(0)
    u = torch.sigmoid(torch.randn(3, generator=gen))
    sigma = 3.0 * u / (1 + 2.0 * u)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = sigma.view(-1, 1, 1, 1, 1) * noise + (1 - sigma.view(-1, 1, 1, 1, 1)) * x0
    torch.testing.assert_close(model.t, sigma * 1000)
    torch.testing.assert_close(model.x, x_t)
    torch.testing.assert_close(loss, ((0.5 * x_t - (noise - x0)) ** 2).mean())


def test_flow_matching_dynamic_shift_and_mask():
    obj = FlowMatching()
    gen = torch.Generator().manual_seed(1)
    sig = obj.sample_sigmas(20000, (32, 32), gen)  # 256x256 image latents: shift 1.6487
    gen = torch.Generator().manual_seed(1)
    u = torch.sigmoid(torch.randn(20000, generator=gen))
    s = resolution_shift(32, 32)
    torch.testing.assert_close(sig, s * u / (1 + (s - 1) * u))
    mask = torch.zeros(2, 1, 2, 2)
    mask[0, 0, 0, 0] = 1
    err_model = _Recorder()
    x0 = torch.randn(2, 3, 1, 2, 2)
    loss = obj.training_loss(err_model, x0, {}, torch.Generator().manual_seed(2), loss_mask_BTHW=mask)
    gen = torch.Generator().manual_seed(2)
    _ = torch.sigmoid(torch.randn(2, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    err = (0.5 * err_model.x - (noise - x0)) ** 2
    torch.testing.assert_close(loss, err[0, :, 0, 0, 0].mean())


def test_zero_terminal_snr_and_v_target():
    betas = rescale_zero_terminal_snr(linear_betas())
    alphas_bar = torch.cumprod(1 - betas, 0)
    assert alphas_bar[-1] == pytest.approx(0, abs=1e-12)
    assert alphas_bar[0] == pytest.approx(1 - 1e-4, abs=1e-9)
    obj = DDPMObjective(prediction="v_prediction", snr_gamma=5.0, dp_rank=1, dp_size=4)
    x0 = torch.randn(8, 2, 1, 2, 2)
    model = _Recorder()
    loss = obj.training_loss(model, x0, {}, torch.Generator().manual_seed(3))
    t = model.t.long()
    assert t.min() >= 250 and t.max() <= 500  # rank 1 of 4: stratum [249.5, 499.5]
    gen = torch.Generator().manual_seed(3)
    _ = torch.rand(8, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen)
    a = obj.alphas_bar[t].float().view(-1, 1, 1, 1, 1)
    target = a.sqrt() * noise - (1 - a).sqrt() * x0
    snr = (a / (1 - a)).view(-1)
    w = torch.clamp(snr, max=5.0) / (snr + 1)
    per = ((0.5 * model.x - target) ** 2) * w.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(loss, per.mean())


def test_epsilon_min_snr_weight():
    obj = DDPMObjective(prediction="epsilon", zero_terminal_snr=False, snr_gamma=5.0)
    snr = obj.snr(torch.tensor([10, 900]))
    assert snr[0] > 5 > snr[1]
    assert math.isclose(obj.alphas_bar[0].item(), 1 - 1e-4)


def test_cfg_with_rescale():
    torch.manual_seed(0)
    vc, vu = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    v = guided_velocity(vc, vu, 8.0, 0.7)
    cfg = vu + 8 * (vc - vu)
    ratio = vc.std(dim=(1, 2), keepdim=True) / cfg.std(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(v, 0.7 * cfg * ratio + 0.3 * cfg)
    assert guided_velocity(vc, None, 8.0) is vc


def test_euler_recovers_straight_path():
    # For x_sigma = sigma * n + (1 - sigma) * x0 the true velocity is n - x0: Euler is exact.
    x0, n = torch.randn(2, 3, 1, 2, 2), torch.randn(2, 3, 1, 2, 2)
    out = euler_flow_sample(lambda x, t: n - x0, n, flow_sigmas(7, shift=3.0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


class _Nonlinear(torch.nn.Module):
    """A 'model' that mixes its input, timestep and condition nonlinearly."""

    def forward(self, x, t, *, scale):
        return torch.tanh(x.float() * scale + t.float().view(-1, 1, 1, 1, 1) / 1000).to(x.dtype)


@pytest.mark.parametrize(
    "objective",
    [
        FlowMatching(shift=3.0),
        FlowMatching(weighting="mode", sigma_eps=1e-3),
        DDPMObjective(prediction="epsilon", zero_terminal_snr=False, snr_gamma=5.0, noise_offset=0.02),
        DDPMObjective(prediction="v_prediction", snr_gamma=5.0, noise_offset=0.02, dp_rank=1, dp_size=2),
        DDPMObjective(prediction="v_prediction", snr_gamma=None),
    ],
    ids=["flow", "flow-mode", "ddpm-eps", "ddpm-v", "ddpm-v-unweighted"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_loss_is_loss_of_model_on_noised_inputs(objective, dtype):
    x0 = torch.randn(3, 4, 2, 4, 4).to(dtype)
    mask = (torch.rand(3, 2, 4, 4) > 0.3).float()
    cond = {"scale": 0.7}

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(3)]

    for loss_mask in (None, mask):
        expected = objective.training_loss(_Nonlinear(), x0, cond, gens(), loss_mask)
        inputs = objective.noised_inputs(x0, gens())
        assert inputs.x_t.dtype == dtype and inputs.target.dtype == torch.float32
        assert (inputs.weight is None) == (getattr(objective, "snr_gamma", None) is None)
        got = objective.loss(_Nonlinear()(inputs.x_t, inputs.timesteps, **cond), inputs, loss_mask)
        assert torch.equal(got, expected)
