"""Clipping rules against sequences computed by hand."""

from __future__ import annotations

import math

import pytest

from megatron_video.training.grad_clip import AdaptiveGradClip, BatchDropClip, FixedGradClip, build_clipper


def _reference(norms, d=0.99):
    """The v1.5 rule written out step by step: (action, threshold-before, mu, var) per step."""
    out, mu, var, first = [], 0.0, 0.0, True
    for g in norms:
        if math.isnan(g):
            out.append(("skip", mu + 3 * math.sqrt(var), mu, var))
            continue
        if first:
            mu, var, first = min(3 * g, 1.0), 0.0, False
            out.append(("none", math.inf, mu, var))
            continue
        thr = mu + 3 * math.sqrt(var)
        ext = max(mu + 5 * math.sqrt(var), 5.0)
        if g <= thr:
            mu = d * mu + (1 - d) * g
            var = d * var + (1 - d) * (mu - g) ** 2
            out.append(("none", thr, mu, var))
        elif g <= ext:
            out.append(("clip", thr, mu, var))
        else:
            out.append(("skip", thr, mu, var))
    return out


def test_adaptive_threshold_sequence_with_nan_and_spikes():
    norms = [0.2, 0.5, 0.55, 0.3, 0.9, float("nan"), 0.31, 0.4, 4.0, 12.0, 0.35]
    clip = AdaptiveGradClip(decay=0.99)
    expected = _reference(norms)
    for g, (action, thr, mu, var) in zip(norms, expected):
        d = clip.decide(g)
        assert d.action == action, (g, d)
        if action != "skip" or not math.isnan(g):
            assert d.threshold == pytest.approx(thr)
        if action == "clip":
            assert d.scale == pytest.approx(thr / g)
        assert (clip.mu, clip.var) == (pytest.approx(mu), pytest.approx(var))
    # First step: mu = min(3 * 0.2, 1) = 0.6; 0.5 and 0.55 are below it; 0.9 exceeds the threshold.
    assert [a for a, *_ in expected] == [
        "none", "none", "none", "none", "clip", "skip", "none", "none", "clip", "skip", "none",
    ]  # fmt: skip
    assert clip.skipped_steps == 2 and clip.clipped_steps == 2


def test_adaptive_state_round_trip():
    a = AdaptiveGradClip()
    for g in (0.3, 0.2, 0.25):
        a.decide(g)
    b = AdaptiveGradClip()
    b.load_state_dict(a.state_dict())
    assert [a.decide(0.27).threshold for _ in range(3)] == [b.decide(0.27).threshold for _ in range(3)]


def test_fixed_and_none():
    f = FixedGradClip(max_norm=1.0)
    assert f.decide(0.5).action == "none"
    d = f.decide(4.0)
    assert d.action == "clip" and d.scale == 0.25
    assert f.decide(float("inf")).action == "skip"
    assert build_clipper("none").decide(1e9).action == "none"
    with pytest.raises(ValueError, match="unknown clip mode"):
        build_clipper("sometimes")


def test_batch_drop_weights():
    c = BatchDropClip(decay=0.99)
    assert c.rank_weights([1.0, 2.0, 1.5, 1.2]) == [1.0, 1.0, 1.0, 1.0]
    assert c.mu == 2.0 and c.var == 2.0  # first step: mu = var = max
    thr = 2.0 + 3 * math.sqrt(2.0)
    w = c.rank_weights([1.0, float("nan"), thr + 1, 1.1])
    assert w == [2.0, 0.0, 0.0, 2.0]  # two of four healthy: the rest scaled by 1 / 0.5
    assert (c.mu, c.var) == (2.0, 2.0)  # two ranks dropped: statistics unchanged
    assert c.rank_weights([float("nan")] * 4) == [0.0] * 4 and c.skipped_steps == 1
