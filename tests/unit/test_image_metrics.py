"""The in-house PSNR / SSIM equal torchmetrics' on random and structured frames."""

from __future__ import annotations

import pytest
import torch

from megatron_video.evaluation.image_metrics import psnr, ssim


def frames(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.linspace(0, 1, 40), torch.linspace(0, 1, 48)
    target = (rows[:, None] * cols[None, :]).expand(3, 3, 40, 48).clone()
    target += 0.2 * torch.rand(3, 3, 40, 48, generator=g)
    pred = target + 0.1 * torch.randn(3, 3, 40, 48, generator=g)
    return pred.clamp(0, 1), target.clamp(0, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_and_ssim_match_torchmetrics(seed):
    tm = pytest.importorskip("torchmetrics.functional.image")
    pred, target = frames(seed)
    want_psnr = tm.peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    want_ssim = tm.structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
    torch.testing.assert_close(psnr(pred, target), want_psnr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ssim(pred, target), want_ssim, rtol=1e-5, atol=1e-5)
    assert 0.2 < float(ssim(pred, target).mean()) < 0.95  # neither trivial nor degenerate


def test_identical_frames_and_small_frames():
    _, target = frames(0)
    assert torch.allclose(ssim(target, target), torch.ones(3), atol=1e-6)
    assert torch.isinf(psnr(target, target)).all()
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(target[..., :8, :8], target[..., :8, :8])
