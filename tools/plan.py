"""Know before you launch: per-device memory and step time of a training stage on a cluster.

    python tools/plan.py STAGE.yaml [STAGE2.yaml ...] [dotted.key=value ...] --devices 512 \
        --device h100|h200|a100|910b|b200|custom [--memory-gb 80] [--search] [--json out.json]

One config: the memory breakdown of the busiest device (weights, gradients, optimizer and EMA
shards, activations by recompute mode with the TP / SP / CP / PP / VPP splits, pipeline
micro-batches in flight, online VAE / text encoders, communication buffers), the step (model and
hardware FLOPs, communication volume per step, what overlap hides) and the predicted step time and
MFU. Several configs: one summary row per stage, with the fastest fitting layout where the stage
as configured does not fit. `--search` lists the fastest layouts (TP, CP, PP, recompute,
micro-batch) that fit. Configs go through the project's loader and validation (`parallel.world_size`
is set to --devices; the text encoders' weight folders are not looked for). The model is
`megatron_video/planning/` (docs/planner.md describes it and what was measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="+", help="stage YAML file(s), then dotted overrides key=value")
    p.add_argument("--devices", type=int, required=True, help="world size")
    p.add_argument("--device", default="h100", help="h100, h200, a100, 910b, b200 or custom")
    p.add_argument("--memory-gb", type=float, default=None, help="device memory (GB); default: the device's")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (custom devices)")
    p.add_argument("--matmul-tflops", type=float, default=None, help="measured bf16 matmul rate")
    p.add_argument("--attention-tflops", type=float, default=None, help="measured attention rate (fwd + bwd)")
    p.add_argument("--intra-gbps", type=float, default=None, help="per-device intra-node bandwidth, GB/s")
    p.add_argument("--inter-gbps", type=float, default=None, help="per-device inter-node bandwidth, GB/s")
    p.add_argument("--devices-per-node", type=int, default=None)
    p.add_argument("--search", action="store_true", help="list the fastest layouts that fit")
    p.add_argument("--top", type=int, default=8, help="layouts listed by --search")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def _layout_text(cfg) -> str:
    p, m, t = cfg.parallel, cfg.model, cfg.training
    parts = [
        f"TP{p.tensor_parallel}{'+SP' if p.sequence_parallel else ''}",
        f"CP{p.context_parallel}",
        f"PP{p.pipeline_parallel}",
    ]
    if p.virtual_pipeline:
        parts.append(f"VPP{p.virtual_pipeline}")
    recompute = m.recompute if m.recompute_num_layers is None else f"{m.recompute}[:{m.recompute_num_layers}]"
    return " ".join(parts) + f" rc={recompute} mbs={t.micro_batch_size}"


def _summary(plan) -> dict:
    s, m = plan.step, plan.memory
    return {
        "fits": plan.fits,
        "needed_gb": round(plan.needed_gb, 2),
        "step_s": round(s.step_s, 3),
        "mfu": round(s.mfu, 4),
        "hfu": round(s.hfu, 4),
        "memory_gb": {name: round(v, 3) for name, v in m.rows()},
        "video_tokens": plan.video_tokens,
        "text_tokens": plan.text_tokens,
    }


def print_breakdown(name: str, cfg, plan) -> None:
    """The full report of one stage."""
    from megatron_video.planning.memory import GB

    s, m, lay = plan.step, plan.memory, plan.layout
    print(
        f"== {name}: {_layout_text(cfg)}, DP{lay.dp}, {lay.micro_batches} micro-batches/step, {plan.device.name}"
    )
    print(
        f"   sample: {plan.video_tokens} video + {plan.text_tokens} text tokens, global batch {cfg.training.global_batch_size}"
    )
    print("   memory per device (busiest pipeline rank), GB:")
    for label, value in m.rows():
        if value > 0:
            print(f"     {label:44s} {value:8.2f}")
    print(f"     {'peak allocated':44s} {m.total / GB:8.2f}")
    print(
        f"     {'needed (+5% allocator slack, +' + str(plan.device.reserved_gb) + ' GB reserved)':44s} "
        f"{plan.needed_gb:8.2f} of {plan.device.memory_gb:.0f}: {'fits' if plan.fits else 'DOES NOT FIT'}"
    )
    for kind, per in m.per_block.items():
        print(f"     saved activations of one {kind} block, one micro-batch, no recompute: {per / GB:.3f} GB")
    c = s.comm
    print("   step:")
    print(
        f"     model FLOPs {s.model_flops:.3e}, hardware FLOPs {s.hardware_flops:.3e} (x{s.hardware_flops / s.model_flops:.2f})"
    )
    print(
        f"     bytes sent per device: TP {c.tensor_parallel / GB:.2f} GB, Ulysses {c.context_parallel / GB:.2f} GB, "
        f"DP grads {c.grad_reduce / GB:.2f} GB + params {c.param_gather / GB:.2f} GB, PP {c.pipeline / GB:.3f} GB"
    )
    print(
        f"     time: compute {s.compute_s:.2f} s + TP {s.tp_s:.2f} + Ulysses {s.cp_s:.2f} + DP exposed "
        f"{s.dp_exposed_s:.2f} (of {s.dp_total_s:.2f}) + PP bubble {s.pp_bubble_s:.2f} + p2p {s.pp_p2p_s:.2f}"
    )
    print(f"     predicted step {s.step_s:.2f} s, MFU {s.mfu:.1%}, HFU {s.hfu:.1%}")


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    from megatron_video.config.schema import load_config
    from megatron_video.errors import ConfigError
    from megatron_video.planning.devices import get_device
    from megatron_video.planning.search import search_layouts
    from megatron_video.planning.stage import plan_stage

    configs = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i] + [f"parallel.world_size={args.devices}"]
    device = get_device(
        args.device,
        memory_gb=args.memory_gb,
        peak_tflops=args.peak_tflops,
        matmul_tflops=args.matmul_tflops,
        attention_tflops=args.attention_tflops,
        intra_node_gbps=args.intra_gbps,
        inter_node_gbps=args.inter_gbps,
        devices_per_node=args.devices_per_node,
    )
    results = {}
    rows = []
    for path in configs:
        name = Path(path).stem
        try:
            cfg = load_config(path, overrides, check_files=False)
        except ConfigError as e:
            print(f"{name}: invalid for {args.devices} devices: {e}")
            results[name] = {"error": str(e)}
            continue
        plan = plan_stage(cfg, args.devices, device)
        results[name] = {"layout": _layout_text(cfg), **_summary(plan)}
        best = None
        if len(configs) == 1:
            print_breakdown(name, cfg, plan)
        if args.search or (len(configs) > 1 and not plan.fits):
            found = search_layouts(cfg, args.devices, device, top=args.top if args.search else 1)
            results[name]["fitting_layouts"] = [{"layout": _layout_text(c), **_summary(p)} for c, p in found]
            best = found[0] if found else None
            if args.search and len(configs) == 1:
                print(f"   fastest layouts that fit ({len(found)} shown):")
                for c, p in found:
                    print(
                        f"     {_layout_text(c):38s} {p.needed_gb:6.1f} GB  step {p.step.step_s:7.2f} s  "
                        f"MFU {p.step.mfu:5.1%}"
                    )
        rows.append((name, cfg, plan, best))
    if len(configs) > 1:
        print(
            f"{args.devices} x {device.name} ({device.memory_gb:.0f} GB, {device.peak_tflops:.0f} TFLOP/s bf16 peak)"
        )
        print(
            "| stage | tokens (video + text) | layout as configured | GB needed | fits | step s | MFU | fastest fitting layout (GB, step s, MFU) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, cfg, plan, best in rows:
            alt = "-"
            if not plan.fits:
                alt = (
                    "none found"
                    if best is None
                    else (
                        f"{_layout_text(best[0])} ({best[1].needed_gb:.1f}, {best[1].step.step_s:.2f}, {best[1].step.mfu:.1%})"
                    )
                )
            print(
                f"| {name} | {plan.video_tokens} + {plan.text_tokens} | {_layout_text(cfg)} | {plan.needed_gb:.1f} | "
                f"{'yes' if plan.fits else 'no'} | {plan.step.step_s:.2f} | {plan.step.mfu:.1%} | {alt} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
