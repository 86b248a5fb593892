"""WF-VAE training losses (Open-Sora-Plan `LPIPSWithDiscriminator3D`, reference section 4.4).

Generator (VAE) loss of one step, for a video x [B, C, T, H, W] and its reconstruction x_hat:

    rec   = |x - x_hat| (or squared)  + perceptual_weight * LPIPS(frame of x, frame of x_hat)
    nll   = sum(rec / exp(logvar) + logvar) / (B * T)       logvar a fixed scalar (0)
    KL    = sum KL(q(z|x) || N(0, I)) / B
    WL    = sum|enc_l1 - dec_l1| / B + sum|enc_l2 - dec_l2| / B      (wavelet-coefficient L1)
    g     = -mean(D(x_hat))
    L_G   = nll + kl_weight * KL + d_weight * disc_factor * g + wavelet_weight * WL
    d_weight = clamp(||dnll/dw|| / (||dg/dw|| + 1e-4), 0, 1e4) * disc_weight,  w = decoder's last conv

Discriminator loss: disc_factor * hinge (0.5 * (mean ReLU(1 - D(x)) + mean ReLU(1 + D(x_hat)))).
Before `disc_start` the VAE trains alone; from then on odd iterations update D only and even
iterations the VAE only (`gan_phase`).

The LPIPS added to `rec` is one number per frame broadcast over that frame's pixels before the sum,
so it weighs C*H*W times a pixel's L1, exactly as in the original.

The wavelet term needs the level-1 / level-2 Haar coefficients the encoder sees and the ones the
decoder predicts. `WaveletTaps` records them with forward hooks on the WF-VAE's modules (the
Open-Sora-Plan copy never returns them, so its `--wavelet_loss` does nothing; here it is wired).

The settings (`VAELossConfig`, `DiscriminatorConfig`) are in `megatron_video/config/vae_training.py`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from megatron_video.config.vae_training import DiscriminatorConfig, VAELossConfig

# --------------------------------------------------------------------------------------------------
# Loss terms
# --------------------------------------------------------------------------------------------------


def kl_loss(posterior) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over every latent element, averaged over the batch."""
    kl = posterior.kl()
    return kl.sum() / kl.shape[0]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean ReLU(1 - D(real)) + mean ReLU(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-D(real)) + mean softplus(D(fake)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def wavelet_loss(
    enc_l1: torch.Tensor, dec_l1: torch.Tensor, enc_l2: torch.Tensor, dec_l2: torch.Tensor
) -> torch.Tensor:
    """sum|enc_l1 - dec_l1| / B + sum|enc_l2 - dec_l2| / B for coefficients [B, C, T, H, W]."""
    b = enc_l1.shape[0]
    return (enc_l1 - dec_l1).abs().sum() / b + (enc_l2 - dec_l2).abs().sum() / b


def adaptive_generator_weight(
    nll: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    disc_weight: float,
    eps: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """clamp(||d nll / d w|| / (||d g / d w|| + eps), 0, max_weight) * disc_weight, detached.

    `w` is the decoder's last layer weight; the gradients are this rank's (not reduced).
    """
    (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = torch.clamp(nll_grad.norm() / (g_grad.norm() + eps), 0.0, max_weight).detach()
    return weight * disc_weight


def gan_phase(step: int, disc_start: int | None) -> Literal["generator", "discriminator"]:
    """Which network iteration `step` (0-based) updates: the VAE alone before `disc_start`,
    then the discriminator on odd iterations and the VAE on even ones."""
    if disc_start is not None and step >= disc_start and step % 2 == 1:
        return "discriminator"
    return "generator"


# --------------------------------------------------------------------------------------------------
# Wavelet coefficient taps
# --------------------------------------------------------------------------------------------------

WAVELET_TAPS: dict[str, tuple[str, str]] = {
    "enc_l1": ("encoder.wavelet_transform_l1", "output"),
    "enc_l2": ("encoder.wavelet_transform_l2", "output"),
    "dec_l1": ("decoder.inverse_wavelet_transform_l1", "input"),
    "dec_l2": ("decoder.inverse_wavelet_transform_l2", "input"),
}
"""Where each coefficient tensor is read: the output of the encoder's level-1 / level-2 Haar
transforms, and the input of the decoder's inverse transforms (the predicted bands; level 1 after
the level-2 reconstruction was added to its low band, as the WF-VAE repository returns them)."""


class WaveletTaps:
    """Records the wavelet coefficients of a WF-VAE forward pass with hooks.

    Hooks are registered once and record only inside `recording()`; chunks of a chunked pass
    are joined along time, so chunked and whole passes give the same tensors.
    """

    def __init__(self, vae: nn.Module):
        self._records: dict[str, list[torch.Tensor]] = {key: [] for key in WAVELET_TAPS}
        self._active = False
        self._handles = []
        for key, (name, where) in WAVELET_TAPS.items():
            try:
                module = vae.get_submodule(name)
            except AttributeError as e:
                raise ValueError(
                    f"the VAE has no submodule '{name}' for the wavelet loss; WAVELET_TAPS in "
                    "megatron_video/training/vae_losses.py follows the module names of "
                    "megatron_video/models/wfvae/model.py and must be updated with them"
                ) from e
            if where == "output":
                hook = module.register_forward_hook(self._output_hook(key))
            else:
                hook = module.register_forward_pre_hook(self._input_hook(key))
            self._handles.append(hook)

    def _output_hook(self, key):
        def hook(module, args, output):
            if self._active:
                self._records[key].append(output)

        return hook

    def _input_hook(self, key):
        def hook(module, args):
            if self._active:
                self._records[key].append(args[0])

        return hook

    @contextmanager
    def recording(self) -> Iterator[WaveletTaps]:
        """Forget earlier records and record the passes run inside the block."""
        for records in self._records.values():
            records.clear()
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(enc_l1, dec_l1, enc_l2, dec_l2) of the recorded pass, each [B, C, T, H, W]."""
        missing = [key for key, records in self._records.items() if not records]
        if missing:
            raise RuntimeError(
                f"no wavelet coefficients recorded for {missing}; run the VAE inside recording()"
            )
        joined = {key: torch.cat(records, dim=2) for key, records in self._records.items()}
        return joined["enc_l1"], joined["dec_l1"], joined["enc_l2"], joined["dec_l2"]

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------


def _norm3d(channels: int, kind: str) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "sync_batch":
        return nn.SyncBatchNorm(channels)
    return nn.GroupNorm(math.gcd(32, channels), channels)


class NLayerDiscriminator3D(nn.Module):
    """3D PatchGAN: video [B, C, T, H, W] -> logits [B, 1, T', H', W'].

    Conv3d k3 s2 + LeakyReLU(0.2); then n_layers - 1 blocks of Conv3d k3 (stride (2, 2, 2) for the
    first, (1, 2, 2) after), norm, LeakyReLU; a stride-1 block at 8x width at most; Conv3d to one
    channel. Module names (`main.<i>`) follow the released discriminator.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 4, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(input_nc, ndf, 3, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv3d(
                    ndf * prev, ndf * mult, 3, stride=(2 if n == 1 else 1, 2, 2), padding=1, bias=False
                ),
                _norm3d(ndf * mult, norm),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv3d(ndf * prev, ndf * mult, 3, stride=1, padding=1, bias=False),
            _norm3d(ndf * mult, norm),
            nn.LeakyReLU(0.2, True),
            nn.Conv3d(ndf * mult, 1, 3, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Conv weights ~ N(0, 0.02); norm scales ~ N(1, 0.02), shifts 0 (the released init)."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        return self.main(video_BCTHW)


def build_discriminator(cfg: DiscriminatorConfig) -> NLayerDiscriminator3D:
    """The RGB discriminator of `cfg`."""
    return NLayerDiscriminator3D(3, cfg.ndf, cfg.n_layers, cfg.norm)


# --------------------------------------------------------------------------------------------------
# LPIPS from local weights (no torchvision)
# --------------------------------------------------------------------------------------------------

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# torchvision feature indices after which LPIPS reads a layer, and that layer's width.
_LPIPS_TAPS = {
    "vgg": ((3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
    "alex": ((1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
}


def _backbone_features(net: str) -> nn.Sequential:
    """torchvision's `vgg16().features` / `alexnet().features` layer for layer (same indices)."""
    if net == "vgg":
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        return nn.Sequential(*layers)
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
    )


class LPIPS(nn.Module):
    """Learned perceptual distance (LPIPS v0.1) of frames [N, 3, H, W] in [-1, 1] -> [N].

    Backbone features at five depths are unit-normalised over channels, their squared
    differences weighted by the linear heads and averaged over pixels, then summed. Frozen.
    """

    def __init__(self, net: Literal["vgg", "alex"] = "vgg"):
        super().__init__()
        if net not in _LPIPS_TAPS:
            raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
        self.net = net
        self.taps, widths = _LPIPS_TAPS[net]
        self.features = _backbone_features(net)[: self.taps[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def _layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, taps = [], set(self.taps)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x_NCHW: torch.Tensor, y_NCHW: torch.Tensor) -> torch.Tensor:
        fx = self._layers((x_NCHW - self.shift) / self.scale)
        fy = self._layers((y_NCHW - self.shift) / self.scale)
        return sum(lin((a - b).pow(2)).mean(dim=(2, 3)) for lin, a, b in zip(self.lins, fx, fy))[:, 0]

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval: no dropout, frozen


def default_lpips_heads(net: str) -> Path | None:
    """The LPIPS v0.1 heads shipped inside torchmetrics or lpips, found without importing them."""
    candidates = (
        ("torchmetrics", ("functional", "image", "lpips_models", f"{net}.pth")),
        ("lpips", ("weights", "v0.1", f"{net}.pth")),
    )
    for package, parts in candidates:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations)), *parts)
        if path.is_file():
            return path
    return None


def load_lpips(net: str, backbone: str | Path, heads: str | Path | None = None) -> LPIPS:
    """LPIPS with backbone weights from a local torchvision state dict and the v0.1 heads.

    Raises FileNotFoundError naming what is missing; nothing is downloaded.
    """
    model = LPIPS(net)  # type: ignore[arg-type]
    backbone = Path(backbone)
    if not backbone.is_file():
        raise FileNotFoundError(
            f"LPIPS backbone weights not found at {backbone}: give a torchvision "
            f"{'vgg16' if net == 'vgg' else 'alexnet'} ImageNet state dict saved locally (nothing is downloaded)"
        )
    heads = Path(heads) if heads is not None else default_lpips_heads(net)
    if heads is None or not heads.is_file():
        raise FileNotFoundError(
            f"LPIPS v0.1 heads for '{net}' not found ({heads or 'no torchmetrics / lpips copy installed'}); "
            f"pass the path of {net}.pth from the lpips package"
        )
    state = torch.load(backbone, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    wanted = model.features.state_dict()
    missing = sorted(set(wanted) - set(features))
    if missing:
        raise KeyError(f"{backbone} is not a torchvision {net} state dict: missing features.{missing[:4]}")
    model.features.load_state_dict({k: features[k] for k in wanted})
    head_state = torch.load(heads, map_location="cpu", weights_only=True)
    for k, lin in enumerate(model.lins):
        key = next((n for n in (f"lin{k}.model.1.weight", f"lin{k}.model.0.weight") if n in head_state), None)
        if key is None:
            raise KeyError(f"{heads} has no weight for LPIPS head {k} (keys {sorted(head_state)[:6]})")
        lin.weight.data.copy_(head_state[key].reshape(lin.weight.shape))
    return model


# --------------------------------------------------------------------------------------------------
# The combined loss
# --------------------------------------------------------------------------------------------------


class VAELoss:
    """Generator and discriminator losses of one step; holds the frozen LPIPS network if used."""

    def __init__(self, cfg: VAELossConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            self.perceptual = load_lpips(cfg.lpips_net, cfg.lpips_backbone, cfg.lpips_heads).to(device)
        self.d_loss_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss

    def disc_factor(self, step: int) -> float:
        """`disc_factor` from `disc_start` on, 0 before (and without a discriminator)."""
        if not self.cfg.gan_enabled or step < self.cfg.disc_start:
            return 0.0
        return self.cfg.disc_factor

    def nll(self, video_BCTHW: torch.Tensor, recon_BCTHW: torch.Tensor) -> torch.Tensor:
        """sum(rec / exp(logvar) + logvar) / (B * T), rec per pixel (+ per-frame LPIPS)."""
        b, c, t, h, w = video_BCTHW.shape
        diff = recon_BCTHW - video_BCTHW
        rec = diff.abs() if self.cfg.rec_loss == "l1" else diff.pow(2)
        if self.perceptual is not None:
            frames = lambda v: v.transpose(1, 2).reshape(b * t, c, h, w)  # noqa: E731
            p = self.perceptual(frames(video_BCTHW), frames(recon_BCTHW)).reshape(b, t)
            rec = rec + self.cfg.perceptual_weight * p[:, None, :, None, None]
        logvar = self.cfg.logvar_init
        return (rec / math.exp(logvar) + logvar).sum() / (b * t)

    def generator_loss(
        self,
        video_BCTHW: torch.Tensor,
        recon_BCTHW: torch.Tensor,
        posterior,
        step: int,
        last_layer: torch.Tensor | None = None,
        discriminator: nn.Module | None = None,
        wavelet_coeffs: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_G, detached terms). The GAN term needs `discriminator` and `last_layer` once started."""
        cfg = self.cfg
        nll = self.nll(video_BCTHW, recon_BCTHW)
        kl = kl_loss(posterior)
        total = nll + cfg.kl_weight * kl
        terms = {
            "l1": (recon_BCTHW - video_BCTHW).abs().mean().detach(),
            "nll": nll.detach(),
            "kl": kl.detach(),
        }
        if cfg.wavelet_weight > 0:
            if wavelet_coeffs is None:
                raise ValueError("loss.wavelet_weight > 0 needs the recorded wavelet coefficients")
            wl = wavelet_loss(*wavelet_coeffs)
            total = total + cfg.wavelet_weight * wl
            terms["wavelet"] = wl.detach()
        factor = self.disc_factor(step)
        if factor > 0:
            if discriminator is None or last_layer is None:
                raise ValueError("the GAN term needs the discriminator and the decoder's last layer")
            g = -discriminator(recon_BCTHW).mean()
            d_weight = adaptive_generator_weight(nll, g, last_layer, cfg.disc_weight)
            total = total + d_weight * factor * g
            terms["g_loss"], terms["d_weight"] = g.detach(), d_weight
        terms["g_total"] = total.detach()
        return total, terms

    def discriminator_loss(
        self, video_BCTHW: torch.Tensor, recon_BCTHW: torch.Tensor, step: int, discriminator: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(disc_factor * D loss on real vs reconstructed, detached logits means)."""
        logits_real = discriminator(video_BCTHW.detach())
        logits_fake = discriminator(recon_BCTHW.detach())
        loss = self.disc_factor(step) * self.d_loss_fn(logits_real, logits_fake)
        return loss, {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
