"""Gradient clipping rules, as pure decisions on gradient norms plus their statistics.

Adaptive (Open-Sora-Plan v1.5, EMA 3 sigma), on the global gradient norm g:
    first step:  mu = min(3 g, 1), var = 0, no clipping
    thr = mu + 3 sqrt(var);  extreme = max(mu + 5 sqrt(var), 5)
    g <= thr:        mu <- d mu + (1 - d) g;  var <- d var + (1 - d) (mu_new - g)^2   (no clip)
    thr < g <= ext:  scale gradients by thr / g;  statistics unchanged
    g > ext or NaN:  the step is skipped and counted (the released code only logs it)

Batch dropping (the v1.3-era variant), on each data-parallel rank's local norm g_r before the
gradient all-reduce: ranks with NaN / Inf or g_r > mu + 3 sigma contribute zero, the others are
scaled by 1 / (fraction of healthy ranks); statistics follow the same EMA on the surviving norm.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class ClipDecision:
    """What to do with this step's gradients."""

    action: str  # "none", "clip" or "skip"
    scale: float = 1.0
    threshold: float = math.inf


class _ClipStatistics:
    """Checkpointing of a rule's statistics: every field except its settings."""

    _settings = ("decay", "max_norm")

    def state_dict(self) -> dict:
        """Statistics for the checkpoint."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self._settings}

    def load_state_dict(self, state: dict) -> None:
        """Restore statistics from a checkpoint."""
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class AdaptiveGradClip(_ClipStatistics):
    """EMA mean + 3 sigma clipping with extreme-step skipping."""

    decay: float = 0.99
    mu: float = 0.0
    var: float = 0.0
    initialized: bool = False
    skipped_steps: int = 0
    clipped_steps: int = 0

    def decide(self, grad_norm: float) -> ClipDecision:
        """Decision for global norm `grad_norm`; updates the statistics."""
        g = float(grad_norm)
        if not math.isfinite(g):
            self.skipped_steps += 1
            return ClipDecision("skip", 0.0, self.threshold)
        if not self.initialized:
            self.mu, self.var, self.initialized = min(3.0 * g, 1.0), 0.0, True
            return ClipDecision("none", 1.0, math.inf)
        std = math.sqrt(self.var)
        thr = self.mu + 3.0 * std
        extreme = max(self.mu + 5.0 * std, 5.0)
        if g <= thr:
            self.mu = self.decay * self.mu + (1 - self.decay) * g
            self.var = self.decay * self.var + (1 - self.decay) * (self.mu - g) ** 2
            return ClipDecision("none", 1.0, thr)
        if g <= extreme:
            self.clipped_steps += 1
            return ClipDecision("clip", thr / g, thr)
        self.skipped_steps += 1
        return ClipDecision("skip", 0.0, thr)

    @property
    def threshold(self) -> float:
        """Current clipping threshold mu + 3 sigma (inf before the first step)."""
        return self.mu + 3.0 * math.sqrt(self.var) if self.initialized else math.inf


@dataclass
class FixedGradClip(_ClipStatistics):
    """Clip to a fixed global norm; non-finite norms skip the step."""

    max_norm: float = 1.0
    skipped_steps: int = 0
    clipped_steps: int = 0

    def decide(self, grad_norm: float) -> ClipDecision:
        g = float(grad_norm)
        if not math.isfinite(g):
            self.skipped_steps += 1
            return ClipDecision("skip", 0.0, self.max_norm)
        if g > self.max_norm:
            self.clipped_steps += 1
            return ClipDecision("clip", self.max_norm / g, self.max_norm)
        return ClipDecision("none", 1.0, self.max_norm)

    @property
    def threshold(self) -> float:
        return self.max_norm


@dataclass
class NoGradClip(FixedGradClip):
    """Never clip; non-finite norms still skip the step."""

    max_norm: float = math.inf


@dataclass
class BatchDropClip(_ClipStatistics):
    """Per-rank dropping of abnormal local gradients before the data-parallel reduction."""

    decay: float = 0.99
    mu: float = 0.0
    var: float = 0.0
    initialized: bool = False
    dropped_rank_steps: int = 0
    skipped_steps: int = 0
    clipped_steps: int = 0

    def rank_weights(self, local_norms: list[float]) -> list[float]:
        """Multiplier of each rank's local gradient (0 = dropped); updates the statistics."""
        finite = [g if math.isfinite(g) else 0.0 for g in local_norms]
        if not self.initialized:
            self.mu = self.var = max(finite)
            self.initialized = True
            return [1.0 if math.isfinite(g) else 0.0 for g in local_norms]
        thr = self.mu + 3.0 * math.sqrt(self.var)
        dropped = [not math.isfinite(g) or g > thr for g in local_norms]
        healthy = len(local_norms) - sum(dropped)
        self.dropped_rank_steps += sum(dropped)
        if healthy == 0:
            self.skipped_steps += 1
            return [0.0] * len(local_norms)
        coef = healthy / len(local_norms)
        weights = [0.0 if d else 1.0 / coef for d in dropped]
        surviving = max(g * w for g, w in zip(finite, weights)) * coef
        if sum(dropped) < 2:
            self.mu = self.decay * self.mu + (1 - self.decay) * surviving
            self.var = self.decay * self.var + (1 - self.decay) * (self.mu - surviving) ** 2
        return weights

    def decide(self, grad_norm: float) -> ClipDecision:
        """After the reduction only non-finite norms remain to be skipped."""
        if not math.isfinite(float(grad_norm)):
            self.skipped_steps += 1
            return ClipDecision("skip", 0.0, self.threshold)
        return ClipDecision("none", 1.0, self.threshold)

    @property
    def threshold(self) -> float:
        return self.mu + 3.0 * math.sqrt(self.var) if self.initialized else math.inf


def build_clipper(mode: str, max_norm: float = 1.0, ema_decay: float = 0.99):
    """The clipping rule named by `mode`."""
    if mode == "adaptive":
        return AdaptiveGradClip(decay=ema_decay)
    if mode == "fixed":
        return FixedGradClip(max_norm=max_norm)
    if mode == "batch_drop":
        return BatchDropClip(decay=ema_decay)
    if mode == "none":
        return NoGradClip()
    raise ValueError(f"unknown clip mode '{mode}'; choose adaptive, fixed, batch_drop or none")
