"""Per-step reporting: a console line, TensorBoard scalars, and a loss-curve PNG at the end."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def model_flops_per_sample(
    num_layers: int, hidden: int, video_tokens: int, text_tokens: int, sparse_n: list[int] | None = None
) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one sample through the SUV blocks.

    Per block: q/k/v/out projections of both streams 8 (N + L) D^2, FFN 16 (N + L) D^2, attention
    4 (N/k + L) (N + L) D for sparsity k (scores and values).
    """
    ks = sparse_n or [1] * num_layers
    n, t, d = video_tokens, text_tokens, hidden
    total = 0.0
    for k in ks:
        total += 2 * (12 * (n + t) * d * d) + 4 * (n / k + t) * (n + t) * d
    return 3 * total


class MetricsLogger:
    """Collects per-step metrics on the main rank and writes them out."""

    def __init__(
        self,
        enabled: bool,
        tensorboard_dir: str | None = None,
        log_interval: int = 1,
        jsonl_path: str | None = None,
    ):
        self.enabled = enabled
        self.log_interval = log_interval
        self.history: list[dict] = []
        self.jsonl_path = Path(jsonl_path) if jsonl_path else None
        self._writer = None
        self._last = time.perf_counter()
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(tensorboard_dir)

    def log(
        self,
        step: int,
        metrics: dict,
        samples: int,
        tokens: int,
        flops: float | None = None,
        peak_tflops: float | None = None,
    ) -> None:
        """Record one optimizer step; print every `log_interval` steps."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        metrics = dict(metrics)
        metrics["samples_per_s"] = samples / max(elapsed, 1e-9)
        metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
        if flops is not None and peak_tflops:
            metrics["mfu"] = flops / max(elapsed, 1e-9) / (peak_tflops * 1e12)
        if torch.cuda.is_available():
            metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        metrics["step"] = step
        if not self.enabled:
            return
        self.history.append(metrics)
        if self.jsonl_path is not None:
            import json

            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(f"train/{key}", value, step)
        if step % self.log_interval == 0:
            parts = [f"step {step}"]
            for key, fmt in (
                ("loss", ".4f"),
                ("grad_norm", ".3f"),
                ("clip_threshold", ".3f"),
                ("skipped_steps", "d"),
                ("lr", ".2e"),
                ("samples_per_s", ".2f"),
                ("tokens_per_s", ".0f"),
                ("mfu", ".3f"),
                ("peak_mem_gib", ".2f"),
                ("peak_rss_gib", ".2f"),
            ):
                if key in metrics:
                    parts.append(f"{key} {format(metrics[key], fmt)}")
            print(" | ".join(parts), flush=True)

    def close(self, loss_curve_png: str | None = None, title: str = "training loss") -> None:
        """Flush TensorBoard and draw the loss curve."""
        if not self.enabled:
            return
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if loss_curve_png and self.history:
            write_loss_curve(
                loss_curve_png, [(m["step"], m["loss"]) for m in self.history if "loss" in m], title
            )


def write_loss_curve(path: str | Path, points: list[tuple[int, float]], title: str = "training loss") -> None:
    """Plot (step, loss) points to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps, losses = zip(*points)
    ax.plot(steps, losses, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
