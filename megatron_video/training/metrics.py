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
import torch.distributed as dist

from megatron_video.planning.devices import device_from_name


def device_peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """Dense bf16 peak of one device for MFU: `configured` (training.logging.device_peak_tflops) when
    set, else the planner's table entry for the device's name (planning/devices.py), else None."""
    if configured:
        return configured
    name = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "npu":
        npu = getattr(torch, "npu", None)
        name = npu.get_device_name(device) if npu is not None else None
    entry = device_from_name(name) if name else None
    return entry.peak_tflops if entry else None


CONSOLE_FIELDS: tuple[tuple[str, str], ...] = (
    ("loss", ".4f"),
    ("grad_norm", ".3f"),
    ("clip_threshold", ".3f"),
    ("skipped_steps", "d"),
    ("lr", ".2e"),
    ("val_loss", ".4f"),
    ("val_loss_ema", ".4f"),
    ("samples_per_s", ".2f"),
    ("tokens_per_s", ".0f"),
    ("mfu", ".3f"),
    ("hfu", ".3f"),
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
        total_steps: int | None = None,
    ):
        """console_fields: (metric, format) pairs of the console line; console_mean: print each
        field's mean over the steps since the last line instead of the current step's value;
        resources: add throughput (samples/s, tokens/s, MFU) and peak memory to every record
        (False keeps records to the caller's metrics, which a resumed run then repeats exactly);
        start_step: a run resumed at this step keeps the JSON lines of earlier steps (and puts
        them in `history`) and drops the later ones it redoes; None appends to the file;
        total_steps: the stage's last step, which adds elapsed time and an ETA to the console line
        (None leaves them out)."""
        self.enabled = enabled
        self.total_steps = total_steps
        self._started: float | None = None
        self._first_step: int | None = None
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
        hardware_flops: float | None = None,
    ) -> None:
        """Record one step (samples and tokens it processed: the throughput of `resources`);
        print every `log_interval` steps. `flops` / `hardware_flops`: the step's model FLOPs and
        the FLOPs the devices execute (recompute, Skiparse padding), summed over all devices;
        with `peak_tflops` (one device) and the world size they give `mfu` and `hfu`."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        if self._started is None:  # the first step of this run: the clock of the ETA starts before it
            self._started, self._first_step = now - elapsed, step - 1
        metrics = dict(metrics)
        if self.resources:
            metrics["samples_per_s"] = samples / max(elapsed, 1e-9)
            metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
            if peak_tflops:
                world = dist.get_world_size() if dist.is_initialized() else 1
                capacity = max(elapsed, 1e-9) * peak_tflops * 1e12 * world
                if flops is not None:
                    metrics["mfu"] = flops / capacity
                if hardware_flops is not None:
                    metrics["hfu"] = hardware_flops / capacity
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
                    self._writer.add_scalar(scalar_tag(key), value, step)
        shown = metrics
        if self.console_mean:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._pending[key].append(value)
        if step % self.log_interval == 0:
            if self.console_mean:
                shown = {key: sum(values) / len(values) for key, values in self._pending.items()}
                self._pending.clear()
            parts = [f"step {step}" if self.total_steps is None else f"step {step}/{self.total_steps}"]
            for key, fmt in self.console_fields:
                if key in shown:
                    parts.append(f"{key} {format(shown[key], fmt)}")
            if self.total_steps is not None and step > self._first_step:
                spent = now - self._started
                left = spent / (step - self._first_step) * max(self.total_steps - step, 0)
                parts.append(f"elapsed {format_duration(spent)} | eta {format_duration(left)}")
            print(" | ".join(parts), flush=True)

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation, sampling) out of the next step's throughput."""
        self._last += seconds

    def add_video(self, tag: str, frames_TCHW_uint8: torch.Tensor, step: int, fps: float) -> None:
        """A video in TensorBoard (its frames as an image strip when moviepy, which add_video needs,
        is not installed)."""
        if self._writer is None:
            return
        import importlib.util

        if importlib.util.find_spec("moviepy") is not None:
            self._writer.add_video(tag, frames_TCHW_uint8[None], step, fps=max(1, round(fps)))
        else:
            strip = torch.cat(list(frames_TCHW_uint8), dim=-1)  # frames side by side: [C, H, T*W]
            self._writer.add_image(f"{tag}/frames", strip, step)

    def add_image(self, tag: str, image_HWC_uint8, step: int) -> None:
        """An image (e.g. a contact sheet) in TensorBoard."""
        if self._writer is not None:
            self._writer.add_image(tag, torch.as_tensor(image_HWC_uint8), step, dataformats="HWC")

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
        validation = {key: [(m["step"], m[key]) for m in self.history if key in m] for key in VALIDATION_KEYS}
        write_loss_curve(loss_curve_png, points, title, {k: v for k, v in validation.items() if v})
        return Path(loss_curve_png)


VALIDATION_KEYS = ("val_loss", "val_loss_ema")
"""Metrics of the validation loss (raw and EMA weights), drawn over the training loss."""


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a metric: validation metrics under `val/`, the rest under `train/`."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def format_duration(seconds: float) -> str:
    """h:mm:ss (m:ss under an hour)."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def smoothed(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): s_i = weighted mean of
    values[:i + 1] with weights weight^(i - k)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** (i + 1)))
    return out


def write_loss_curve(
    path: str | Path,
    points: list[tuple[int, float]],
    title: str = "training loss",
    validation: dict[str, list[tuple[int, float]]] | None = None,
    smoothing: float | None = None,
) -> None:
    """Plot (step, loss) points to a PNG: the raw points faint, their smoothed line over them, and
    each validation series (name -> (step, loss) points) as a marked line.

    smoothing: weight of the moving average (None: 0.9, lowered for short runs so the line still
    follows the trend: 1 - 5 / steps at most)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    steps, losses = zip(*points)
    weight = smoothing if smoothing is not None else min(0.9, max(0.0, 1 - 5 / max(len(points), 1)))
    ax.plot(steps, losses, lw=0.8, alpha=0.3, color="tab:blue", label="training loss")
    ax.plot(
        steps, smoothed(losses, weight), lw=1.6, color="tab:blue", label=f"training loss (EMA {weight:.2f})"
    )
    colors = {"val_loss": "tab:orange", "val_loss_ema": "tab:green"}
    names = {"val_loss": "validation (raw weights)", "val_loss_ema": "validation (EMA weights)"}
    for key, series in (validation or {}).items():
        v_steps, v_losses = zip(*series)
        ax.plot(v_steps, v_losses, "o-", ms=3, lw=1.4, color=colors.get(key), label=names.get(key, key))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
