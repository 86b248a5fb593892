"""The prepared GPU check (`bash benchmarks/gpu_check.sh`): kernels, bf16 SUV steps, Skiparse ratios.

On one CUDA device, in under 8 minutes:
  (a) the achieved bf16 matmul rate (8192^2 products; the planner's --matmul-tflops), and every attention backend of `platform.attention.BACKENDS` that runs here, forward + backward
      on dense and Skiparse shapes with key masks, against SDPA's math kernel in fp32 (bf16
      tolerance: relative L2 error <= 2e-2 for the output and each gradient), and its time;
  (b) bf16 training steps of the 2B SUV on one device (DP = 1, distributed optimizer, EMA) at
      9x288x512 and 57x288x512, dense and Skiparse: step time, model-FLOP MFU and hardware-FLOP
      utilisation (planning/flops.py), peak memory (`torch.cuda.max_memory_allocated`) against the
      planner's prediction (planning/memory.py);
  (c) Skiparse against dense: joint attention and whole-block forward + backward time at k = 1, 2,
      4, 8 with the fastest correct backend, against the planner's FLOP ratios.
It prints one table and writes gpu_check.json under $OUT (else benchmarks/out/).

Without CUDA it says so, prints the dry run (cases, shapes, configs and the planner's predictions
for an H100 and an H200) and exits 0. `--smoke` runs the GPU path on the CPU at toy sizes (tiny
flavor, fp32 reference), which is how the GPU code is exercised without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

STEP_SHAPES = [(9, 288, 512), (57, 288, 512)]
"""(frames, height, width) of the training-step cases (WF-VAE 8x8x8: 1,152 and 4,608 video tokens)."""
TEXT_TOKENS = 512
TOLERANCE = 2e-2
"""Relative L2 error allowed against the fp32 math kernel (bf16 keeps 8 mantissa bits)."""


def _step_cases(smoke: bool) -> list[dict]:
    shapes = [(9, 32, 32), (17, 32, 32)] if smoke else STEP_SHAPES
    return [dict(frames=f, height=h, width=w, skiparse=s) for f, h, w in shapes for s in (False, True)]


def _config(smoke: bool, frames: int, height: int, width: int):
    """The ExperimentConfig of a step case (one device, bf16, distributed optimizer, EMA)."""
    from megatron_video.config import build_config

    model = {"flavor": "tiny"} if smoke else {"flavor": "2B"}
    return build_config(
        {
            "model": model,
            "runtime": {"dtype": "bf16", "attention_backend": "sdpa"},
            "shape": {
                "num_frames": frames,
                "height": height,
                "width": width,
                "text_length": 16 if smoke else TEXT_TOKENS,
            },
            "training": {
                "micro_batch_size": 1,
                "global_batch_size": 1,
                "ema_decay": 0.999,
                "optimizer": {"warmup_steps": 0},
            },
        }
    )


def _dense(cfg):
    import copy

    dense = copy.deepcopy(cfg)
    dense.model.sparse_n = [1] * len(cfg.model.num_layers)
    return dense


def planner_rows(smoke: bool = False) -> list[dict]:
    """The planner's predictions for the step cases on an H100 and an H200."""
    from megatron_video.planning.devices import DEVICES
    from megatron_video.planning.memory import GB
    from megatron_video.planning.stage import plan_stage

    rows = []
    for case in _step_cases(smoke):
        cfg = _config(smoke, case["frames"], case["height"], case["width"])
        cfg = cfg if case["skiparse"] else _dense(cfg)
        for name in ("h100", "h200"):
            plan = plan_stage(cfg, 1, DEVICES[name])
            rows.append(
                dict(
                    case=_case_name(case),
                    device=name,
                    video_tokens=plan.video_tokens,
                    sparse_n=cfg.model.sparse_n,
                    predicted_peak_gb=round(plan.memory.total / GB, 2),
                    fits=plan.fits,
                    predicted_step_s=round(plan.step.step_s, 3),
                    predicted_mfu=round(plan.step.mfu, 3),
                )
            )
    return rows


def _case_name(case: dict) -> str:
    return f"{case['frames']}x{case['height']}x{case['width']} {'skiparse' if case['skiparse'] else 'dense'}"


def attention_shapes(smoke: bool) -> list[dict]:
    """(a) shapes: [batch, heads, queries, keys, head_dim] of dense and Skiparse joint attention at
    57x288x512 (4,608 video + 512 text tokens, 24 heads of 64), the last sample's keys 20% masked."""
    n, lt, heads, d = (256, 16, 4, 16) if smoke else (4608, TEXT_TOKENS, 24, 64)
    return [dict(name=f"k={k}", batch=k, heads=heads, seq=n // k + lt, head_dim=d) for k in (1, 4)]


# -- (a) attention kernels ---------------------------------------------------------------------------


def _timed(fn, device, repeats: int) -> float:
    """Mean seconds of fn() after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_attention(device, dtype, smoke: bool) -> list[dict]:
    """Each available backend against SDPA math in fp32, forward and backward, and its time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_video.platform.attention import BACKENDS, AttentionBackendUnavailable, attention

    rows = []
    for shape in attention_shapes(smoke):
        g = torch.Generator(device="cpu").manual_seed(0)
        b, h, s, d = shape["batch"], shape["heads"], shape["seq"], shape["head_dim"]
        q, k, v, grad = (torch.randn(b, h, s, d, generator=g).to(device, dtype) for _ in range(4))
        keep = torch.ones(b, s, dtype=torch.bool)
        keep[-1, int(0.8 * s) :] = False
        keep = keep.to(device)
        scale = d**-0.5
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch.nn.functional.scaled_dot_product_attention(
                qf, kf, vf, attn_mask=keep[:, None, None, :], scale=scale
            )
        ref.backward(grad.float())
        reference = [ref.detach(), qf.grad, kf.grad, vf.grad]
        for backend in BACKENDS:
            for masked in (True, False) if backend == "sdpa" else (True,):
                name = backend if masked else "sdpa (no mask)"
                row = dict(
                    shape=shape["name"],
                    backend=name,
                    **{k_: shape[k_] for k_ in ("batch", "heads", "seq", "head_dim")},
                )
                x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                mask = keep if masked else None

                def run(x=x, mask=mask, backend=backend, scale=scale, grad=grad):
                    out = attention(*x, mask, scale, backend)
                    out.backward(grad)
                    return out

                def again(x=x, run=run):
                    for t in x:
                        t.grad.zero_()
                    return run()

                try:
                    out = run()
                except (AttentionBackendUnavailable, ImportError, RuntimeError) as e:
                    row.update(available=False, reason=str(e).splitlines()[0][:160])
                    rows.append(row)
                    continue
                if masked:
                    errors = [_relative(out, reference[0])] + [
                        _relative(t.grad, r) for t, r in zip(x, reference[1:])
                    ]
                    row.update(max_rel_error=max(errors), correct=max(errors) <= TOLERANCE)
                else:
                    row.update(max_rel_error=None, correct=None)  # another problem (no key masked)
                seconds = _timed(again, device, 3 if smoke else 10)
                flops = 3 * 4 * b * h * s * s * d
                row.update(
                    available=True, ms=round(seconds * 1e3, 3), tflops=round(flops / seconds / 1e12, 1)
                )
                rows.append(row)
    return rows


def matmul_rate(device, dtype, smoke: bool) -> dict:
    """Achieved dense matmul rate (the planner's `--matmul-tflops`) on square products."""
    size = 256 if smoke else 8192
    a, b = (torch.randn(size, size).to(device, dtype) for _ in range(2))
    seconds = _timed(lambda: a @ b, device, 3 if smoke else 20)
    return dict(size=size, dtype=str(dtype), tflops=round(2 * size**3 / seconds / 1e12, 1))


# -- (b) training steps ------------------------------------------------------------------------------


def _init_process_group(device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if device.type != "cuda":
        from megatron_video.platform.megatron_cpu import apply_megatron_cpu_adaptation

        apply_megatron_cpu_adaptation()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class _Batches:
    def __init__(self, cfg, device):
        from megatron_video.data.batches import TrainBatch

        m = cfg.model
        t, h, w = cfg.latent_grid
        g = torch.Generator().manual_seed(0)
        self.batch = TrainBatch(
            torch.randn(1, m.in_channels, t, h, w, generator=g).to(device),
            {
                "text_BLC": torch.randn(1, cfg.shape.text_length, m.caption_channels, generator=g).to(device),
                "pooled_BP": torch.randn(1, m.pooled_projection_dim, generator=g).to(device),
            },
        )

    def next_batch(self):
        return self.batch


def _memory(device) -> tuple[callable, callable]:
    if device.type == "cuda":
        return torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated
    return (lambda: None), (lambda: 0)


def training_steps(device, smoke: bool, peak_tflops: float | None, backend: str) -> list[dict]:
    """(b): bf16 steps of the 2B SUV (tiny with --smoke) per shape, dense and Skiparse."""
    from megatron_video.parallel.setup import setup_parallel
    from megatron_video.planning.devices import DEVICES
    from megatron_video.planning.flops import sample_flops, video_tokens
    from megatron_video.planning.memory import GB, memory_breakdown
    from megatron_video.planning.stage import layout_from_config
    from megatron_video.platform.launch import Runtime
    from megatron_video.training.denoisers import build_model
    from megatron_video.training.loop import Trainer

    _init_process_group(device)
    reset, peak = _memory(device)
    rows = []
    cases = _step_cases(smoke)
    first = _config(smoke, cases[0]["frames"], cases[0]["height"], cases[0]["width"])
    first.runtime.attention_backend = backend
    rt = setup_parallel(first, Runtime(device, 0, 1, 0))
    with device:
        model = build_model(first.model, rt.plan, backend)
    model = model.to(device)
    trainer = Trainer(first, rt, model)
    warmup, timed = (1, 1) if smoke else (2, 3)
    for case in cases:
        cfg = _config(smoke, case["frames"], case["height"], case["width"])
        cfg = cfg if case["skiparse"] else _dense(cfg)
        for block, k in zip(model.blocks(), cfg.model.block_sparse_n):
            block.sparse_n = k  # the same weights, dense or Skiparse attention
        source = _Batches(cfg, device)
        n = video_tokens(cfg.model, cfg.latent_grid)
        for _ in range(warmup):
            trainer.train_step(source)
        reset()
        _sync(device)
        start = time.perf_counter()
        for _ in range(timed):
            trainer.train_step(source)
        _sync(device)
        step_s = (time.perf_counter() - start) / timed
        flops = sample_flops(cfg.model, n, cfg.shape.text_length)
        layout = layout_from_config(cfg, 1)
        predicted = memory_breakdown(cfg.model, layout, n, cfg.shape.text_length).total
        measured = peak()
        row = dict(case=_case_name(case), video_tokens=n, step_s=round(step_s, 4))
        if peak_tflops:
            row.update(
                mfu=round(flops.model / step_s / (peak_tflops * 1e12), 4),
                hfu=round(flops.hardware / step_s / (peak_tflops * 1e12), 4),
            )
        row.update(peak_gb=round(measured / GB, 3), predicted_gb=round(predicted / GB, 3))
        if measured:
            row["memory_error"] = round((predicted - measured) / measured, 4)
        rows.append(row)
        gc.collect()
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _ = DEVICES
    return rows


# -- (c) Skiparse vs dense ---------------------------------------------------------------------------


def skiparse_ratios(device, dtype, smoke: bool, backend: str) -> list[dict]:
    """(c): joint attention and one SUV block, forward + backward, at k = 1, 2, 4, 8 (57x288x512)."""
    from megatron_video.models.common.attention import joint_skiparse_attention
    from megatron_video.models.suv.model import SUVBlock
    from megatron_video.parallel.setup import build_parallel_plan
    from megatron_video.planning.flops import suv_block_flops

    cfg = _config(smoke, *((17, 32, 32) if smoke else STEP_SHAPES[1]))
    m = cfg.model
    t, hh, ww = cfg.latent_grid
    n, lt = t * (hh // m.patch_size) * (ww // m.patch_size), cfg.shape.text_length
    heads, d = m.num_heads, m.head_dim
    g = torch.Generator().manual_seed(0)
    video = [torch.randn(n, 1, heads, d, generator=g).to(device, dtype) for _ in range(3)]
    text = [torch.randn(lt, 1, heads, d, generator=g).to(device, dtype) for _ in range(3)]
    video_keep = torch.ones(1, n, dtype=torch.bool, device=device)
    text_keep = torch.ones(1, lt, dtype=torch.bool, device=device)
    plan = build_parallel_plan(cfg)
    x = torch.randn(n, 1, m.hidden_size, generator=g).to(device)
    c = torch.randn(lt, 1, m.hidden_size, generator=g).to(device)
    temb = torch.randn(1, m.timestep_embed_dim, generator=g).to(device)
    from megatron_video.models.common.rope import rope_3d_tables

    rope = rope_3d_tables((t, hh // m.patch_size, ww // m.patch_size), d, device=device)
    with device:
        block = SUVBlock(m, plan, sparse_n=1, group=False).to(device)
    rows, base = [], {}
    repeats = 3 if smoke else 10
    for k in (1, 2, 4, 8):
        tensors = [v.detach().clone().requires_grad_() for v in video + text]

        def attn(tensors=tensors, k=k):
            out, out_text = joint_skiparse_attention(*tensors, video_keep, text_keep, k, False, backend)
            (out.float().sum() + out_text.float().sum()).backward()

        block.sparse_n = k
        xs = [x.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()]

        def whole(xs=xs):
            out_x, out_c = block(xs[0], xs[1], temb, rope, video_keep, text_keep, backend)
            (out_x.float().sum() + out_c.float().sum()).backward()

        attn_s, block_s = _timed(attn, device, repeats), _timed(whole, device, repeats)
        flops = suv_block_flops(m, n, lt, k)
        if k == 1:
            base = dict(attn=attn_s, block=block_s, fa=flops.attention, fb=flops.linear + flops.attention)
        rows.append(
            dict(
                k=k,
                attention_ms=round(attn_s * 1e3, 3),
                block_ms=round(block_s * 1e3, 3),
                attention_speedup=round(base["attn"] / attn_s, 3),
                block_speedup=round(base["block"] / block_s, 3),
                planner_attention_flop_ratio=round(base["fa"] / flops.attention, 3),
                planner_block_flop_ratio=round(base["fb"] / (flops.linear + flops.attention), 3),
            )
        )
    return rows


# -- report ------------------------------------------------------------------------------------------


def _print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        print("  (none)")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


def _out_dir() -> Path:
    out = os.environ.get("OUT")
    return Path(out) if out else Path(__file__).resolve().parent / "out"


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="run the GPU path on the CPU at toy sizes")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report: dict = {"torch": torch.__version__}
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device here: dry run (cases, shapes and the planner's predictions); nothing timed")
        report.update(cuda=False, attention_shapes=attention_shapes(False), planner=planner_rows())
        _print_table("(a) attention shapes to check", report["attention_shapes"])
        _print_table("(b) SUV 2B training-step cases: planner predictions", report["planner"])
    else:
        from megatron_video.planning.devices import device_from_name

        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
        known = device_from_name(name)
        peak = known.peak_tflops if known else None
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        report.update(cuda=device.type == "cuda", device=name, peak_tflops=peak)
        print(f"device: {name} (bf16 peak {peak} TFLOP/s)", flush=True)
        report["matmul"] = matmul_rate(device, dtype, args.smoke)
        print(f"matmul {report['matmul']}", flush=True)
        report["attention"] = check_attention(device, dtype, args.smoke)
        _print_table("(a) attention kernels vs SDPA math (fp32)", report["attention"])
        correct = [r for r in report["attention"] if r.get("correct") and r["shape"] == "k=1"]
        backend = min(correct, key=lambda r: r["ms"])["backend"] if correct else "sdpa"
        report["fastest_backend"] = backend
        report["steps"] = training_steps(device, args.smoke, peak, backend)
        _print_table(f"(b) bf16 SUV steps on one device (attention backend {backend})", report["steps"])
        report["skiparse"] = skiparse_ratios(device, dtype, args.smoke, backend)
        _print_table("(c) Skiparse vs dense, forward + backward", report["skiparse"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = _out_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwrote {out / 'gpu_check.json'} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
