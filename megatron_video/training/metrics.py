"""Per-step reporting: a console line, metrics.jsonl, TensorBoard scalars, and a loss-curve PNG at the end.

Used by the denoiser stages (`stage.py`) and the VAE trainer (`vae_trainer.py`).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
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


CONSOLE_FIELDS: tuple[tuple[str, str], ...] = (
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
)
"""(metric, format) of the console line, in order; metrics a step lacks are left out."""


class MetricsLogger:
    """Collects per-step metrics on the main rank and writes them out.

    Every record goes to `history`, one JSON line, and TensorBoard (numbers only; strings such as
    the VAE trainer's phase stay in the JSON line and the console).
    """

    def __init__(
        self,
        enabled: bool,
        tensorboard_dir: str | None = None,
        log_interval: int = 1,
        jsonl_path: str | None = None,
        console_fields: Sequence[tuple[str, str]] = CONSOLE_FIELDS,
        console_mean: bool = False,
        resources: bool = True,
        start_step: int | None = None,
    ):
        """console_fields: (metric, format) pairs of the console line; console_mean: print each
        field's mean over the steps since the last line instead of the current step's value;
        resources: add throughput (samples/s, tokens/s, MFU) and peak memory to every record
        (False keeps records to the caller's metrics, which a resumed run then repeats exactly);
        start_step: a run resumed at this step keeps the JSON lines of earlier steps (and puts
        them in `history`) and drops the later ones it redoes; None appends to the file."""
        self.enabled = enabled
        self.log_interval = log_interval
        self.history: list[dict] = []
        self.jsonl_path = Path(jsonl_path) if jsonl_path else None
        self.console_fields = tuple(console_fields)
        self.console_mean = console_mean
        self.resources = resources
        self._pending: dict[str, list[float]] = defaultdict(list)
        self._writer = None
        self._last = time.perf_counter()
        if enabled and self.jsonl_path is not None and start_step is not None:
            if self.jsonl_path.is_file():
                records = (
                    json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line.strip()
                )
                self.history = [r for r in records if r["step"] < start_step]
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self.jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(tensorboard_dir)

    def log(
        self,
        step: int,
        metrics: dict,
        samples: int = 0,
        tokens: int = 0,
        flops: float | None = None,
        peak_tflops: float | None = None,
    ) -> None:
        """Record one step (samples and tokens it processed: the throughput of `resources`);
        print every `log_interval` steps."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        metrics = dict(metrics)
        if self.resources:
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
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(f"train/{key}", value, step)
        shown = metrics
        if self.console_mean:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._pending[key].append(value)
        if step % self.log_interval == 0:
            if self.console_mean:
                shown = {key: sum(values) / len(values) for key, values in self._pending.items()}
                self._pending.clear()
            parts = [f"step {step}"]
            for key, fmt in self.console_fields:
                if key in shown:
                    parts.append(f"{key} {format(shown[key], fmt)}")
            print(" | ".join(parts), flush=True)

    def close(
        self, loss_curve_png: str | None = None, title: str = "training loss", loss_key: str = "loss"
    ) -> Path | None:
        """Flush TensorBoard and draw the curve of `loss_key` over the steps; returns the PNG written."""
        if not self.enabled:
            return None
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        points = [(m["step"], m[loss_key]) for m in self.history if loss_key in m]
        if not loss_curve_png or not points:
            return None
        write_loss_curve(loss_curve_png, points, title)
        return Path(loss_curve_png)


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
