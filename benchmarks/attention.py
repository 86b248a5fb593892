"""Skiparse attention against dense attention on CPU: measured speed-ups and why they fall short of k.

Times `joint_skiparse_attention` (forward + backward) with sparsity k (`sparse_n`) against the
same call with k = 1 (dense joint attention) on the same video + text sequence, then an `SUVBlock`
with k against the same block (same weights) with k = 1, then the Open-Sora-Plan v1.3 `DiTBlock`
(Skiparse self-attention k = 4, Single on even blocks and Group on odd ones, dense cross-attention
to the text) against the same block with dense self-attention, side by side. All variants of one shape run
round-robin, in a rotated order each round, so machine noise reaches dense and sparse alike; every
time is a median over rounds, after one untimed warm-up run of each variant. Every timed run is
under torch.profiler, which splits it into time inside the SDPA kernels (forward and backward),
inside other ops (padding, regrouping, the [video ; text] concatenation, permutes, and their
backward) and in no op; the summary explains each speed-up under 0.7 k from these measurements.

    python benchmarks/attention.py                  # default sizes, about 10 minutes on 2 cores
    python benchmarks/attention.py --quick          # under a minute: checks that the script works
    python benchmarks/attention.py --json out.json  # also write every number as JSON
    python benchmarks/attention.py --only-dit-block # just the v1.3 DiT block, Skiparse k = 4 vs dense

Shapes: N video tokens, L text tokens, B batch, h heads, d head dim, D block width. The Skiparse
sparsity is `sparse_n` (as `model.sparse_n`; `--sparse-n` here), written k in the prose and tables.
Video tensors are sequence-first [N, B, h, d], text [L, B, h, d], as the attention function takes
them. FLOP counts are nominal matmul FLOPs: forward 4 B h S_q S_k d, backward 2.5 x forward.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_video.models.common.attention import joint_skiparse_attention
from megatron_video.models.common.rope import rope_3d_tables
from megatron_video.models.common.skiparse import skiparse_padding
from megatron_video.models.opensora_dit.model import DiTBlock
from megatron_video.models.suv.model import SUVBlock
from megatron_video.parallel.setup import build_parallel_plan, initialize_model_parallel
from megatron_video.testing.models import tiny_config

KERNEL_EVENT = "scaled_dot_product"
"""Substring of the profiler events of the SDPA kernels, forward and backward."""

MODES = {"single": False, "group": True}
"""Skiparse mode name -> the `group` flag of the attention call."""


@dataclass
class Sample:
    """One profiled run: wall seconds, SDPA-kernel seconds, other ops' seconds (by op name)."""

    wall_s: float
    kernel_s: float
    other_ops: dict[str, float]


@dataclass
class Run:
    """One variant at one shape, medians over rounds."""

    median_s: float
    min_s: float
    """Fastest round, wall seconds."""

    kernel_s: float
    """Seconds inside the SDPA kernels, forward and backward."""

    other_ops_s: float
    """Seconds inside every other op: pads, regroup copies, cats, zero-fills, sums, linears, ..."""

    unattributed_s: float
    """Wall seconds in no op: Python and the autograd engine."""

    top_other: list[tuple[str, float]]
    """The three other ops with the most seconds (mean over rounds)."""

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> Run:
        ops = {
            name: sum(s.other_ops.get(name, 0.0) for s in samples) / len(samples)
            for name in samples[0].other_ops
        }
        return cls(
            median_s=statistics.median(s.wall_s for s in samples),
            min_s=min(s.wall_s for s in samples),
            kernel_s=statistics.median(s.kernel_s for s in samples),
            other_ops_s=statistics.median(sum(s.other_ops.values()) for s in samples),
            unattributed_s=statistics.median(
                s.wall_s - s.kernel_s - sum(s.other_ops.values()) for s in samples
            ),
            top_other=sorted(ops.items(), key=lambda item: -item[1])[:3],
        )


def profiled(step: Callable[[], None]) -> Sample:
    """Run `step` once under the profiler and split its wall time by op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernel = sum(e.self_cpu_time_total for e in events if KERNEL_EVENT in e.key) / 1e6
    other = {e.key: e.self_cpu_time_total / 1e6 for e in events if KERNEL_EVENT not in e.key}
    return Sample(wall, kernel, other)


def run_round_robin(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, Run]:
    """Warm every step up once, then run each once per round in a rotated order, every run profiled."""
    names = list(steps)
    for name in names:
        steps[name]()  # the first call at a new shape pays one-off allocation costs
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(profiled(steps[name]))
    return {name: Run.from_samples(samples[name]) for name in names}


def attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Nominal forward + backward matmul FLOPs of self-attention over `seq` tokens."""
    return 3.5 * 4 * batch * heads * seq * seq * head_dim


def attention_steps(n: int, num_text: int, heads: int, head_dim: int, sparse_ns, modes) -> dict:
    """Forward + backward closures of joint attention: 'dense' (sparse_n = 1) and '<mode> k=<sparse_n>'."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    inputs = [rand(n, 1, heads, head_dim) for _ in range(3)] + [
        rand(num_text, 1, heads, head_dim) for _ in range(3)
    ]
    grads = (
        torch.randn(n, 1, heads, head_dim, generator=gen),
        torch.randn(num_text, 1, heads, head_dim, generator=gen),
    )
    video_keep_BN = torch.ones(1, n, dtype=torch.bool)
    text_keep_BL = torch.ones(1, num_text, dtype=torch.bool)

    def make(sparse_n: int, group: bool) -> Callable[[], None]:
        def step() -> None:
            out = joint_skiparse_attention(*inputs, video_keep_BN, text_keep_BL, sparse_n, group)
            torch.autograd.grad(out, inputs, grads)

        return step

    steps = {"dense": make(1, False)}
    for mode in modes:
        for sparse_n in sparse_ns:
            steps[f"{mode} k={sparse_n}"] = make(sparse_n, MODES[mode])
    return steps


def _sparse_vs_dense_steps(block_cls, model_cfg, plan, inputs, grads, sparse_ns, modes) -> dict:
    """'dense' and '<mode> k=<sparse_n>' forward + backward closures of `block_cls` on the same weights
    (each sparse block load_state_dict's the dense one); `inputs` are the block's positional arguments."""
    dense = block_cls(model_cfg, plan, sparse_n=1, group=False)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def make(block) -> Callable[[], None]:
        wrt = [*leaves, *block.parameters()]

        def step() -> None:
            torch.autograd.grad(block(*inputs, "sdpa"), wrt, grads, allow_unused=True)

        return step

    steps = {"dense": make(dense)}
    for mode in modes:
        for sparse_n in sparse_ns:
            block = block_cls(model_cfg, plan, sparse_n=sparse_n, group=MODES[mode])
            block.load_state_dict(dense.state_dict())
            steps[f"{mode} k={sparse_n}"] = make(block)
    return steps


def _video_grid(n: int) -> tuple[int, int, int]:
    """(T, H, W) latent-token grid of N tokens with square frames of up to 32 x 32."""
    side = 32
    while n % (side * side):
        side //= 2
    return n // (side * side), side, side


def block_steps(n: int, num_text: int, heads: int, head_dim: int, sparse_ns, modes) -> dict:
    """Forward + backward closures of one SUVBlock: 'dense' and '<mode> k=<sparse_n>', same weights."""
    cfg = tiny_config(num_heads=heads, head_dim=head_dim)
    gen = torch.Generator().manual_seed(0)
    d, e = cfg.model.hidden_size, cfg.model.timestep_embed_dim
    inputs = (
        torch.randn(n, 1, d, generator=gen).requires_grad_(),  # x_SBD
        torch.randn(num_text, 1, d, generator=gen).requires_grad_(),  # c_LBD
        torch.randn(1, e, generator=gen).requires_grad_(),  # temb_BE
        rope_3d_tables(_video_grid(n), head_dim),
        torch.ones(1, n, dtype=torch.bool),  # video_keep_BN
        torch.ones(1, num_text, dtype=torch.bool),  # text_keep_BL
    )
    grads = (torch.randn(n, 1, d, generator=gen), torch.randn(num_text, 1, d, generator=gen))
    return _sparse_vs_dense_steps(
        SUVBlock, cfg.model, build_parallel_plan(cfg), inputs, grads, sparse_ns, modes
    )


def dit_block_steps(n: int, num_text: int, heads: int, head_dim: int, sparse_ns, modes) -> dict:
    """Forward + backward closures of one v1.3 DiTBlock: 'dense' and '<mode> k=<sparse_n>', same weights
    (the block's self-attention is Skiparse; its cross-attention to the text is dense either way)."""
    from megatron_video.testing.opensora_dit import tiny_dit_config

    cfg = tiny_dit_config(num_heads=heads, head_dim=head_dim, caption_channels=64)
    gen = torch.Generator().manual_seed(0)
    d = cfg.model.hidden_size
    inputs = (
        torch.randn(n, 1, d, generator=gen).requires_grad_(),  # x_SBD
        torch.randn(num_text, 1, d, generator=gen).requires_grad_(),  # c_LBD
        torch.randn(6, 1, d, generator=gen).requires_grad_(),  # t6_6BD
        rope_3d_tables(_video_grid(n), head_dim, axis_dims=(head_dim // 3,) * 3),
        torch.ones(1, n, dtype=torch.bool),  # video_keep_BN
        torch.ones(1, num_text, dtype=torch.bool),  # text_keep_BL
    )
    grad = torch.randn(n, 1, d, generator=gen)
    return _sparse_vs_dense_steps(
        DiTBlock, cfg.model, build_parallel_plan(cfg), inputs, grad, sparse_ns, modes
    )


def attention_rows(runs: dict[str, Run], n: int, num_text: int, heads: int, head_dim: int, sparse_ns, modes):
    """Table rows with the theory (FLOP ratio with the text keys) and the measured split."""
    dense = runs["dense"]
    dense_flops = attention_flops(1, heads, n + num_text, head_dim)
    rows = []
    for mode in modes:
        for sparse_n in sparse_ns:
            sparse = runs[f"{mode} k={sparse_n}"]
            seq_j = (n + skiparse_padding(n, sparse_n)) // sparse_n + num_text
            flop_ratio = dense_flops / attention_flops(sparse_n, heads, seq_j, head_dim)
            rows.append(
                dict(
                    tokens=n,
                    text_len=num_text,
                    head_dim=head_dim,
                    heads=heads,
                    mode=mode,
                    sparse_n=sparse_n,
                    dense_ms=1e3 * dense.median_s,
                    sparse_ms=1e3 * sparse.median_s,
                    speedup=dense.median_s / sparse.median_s,
                    speedup_per_k=dense.median_s / sparse.median_s / sparse_n,
                    sub_sequence=seq_j,
                    flop_ratio=flop_ratio,
                    speedup_of_min=dense.min_s / sparse.min_s,
                    kernel_speedup=dense.kernel_s / sparse.kernel_s,
                    dense_kernel_ms=1e3 * dense.kernel_s,
                    sparse_kernel_ms=1e3 * sparse.kernel_s,
                    dense_other_ops_ms=1e3 * dense.other_ops_s,
                    sparse_other_ops_ms=1e3 * sparse.other_ops_s,
                    dense_unattributed_ms=1e3 * dense.unattributed_s,
                    sparse_unattributed_ms=1e3 * sparse.unattributed_s,
                    dense_gflops=dense_flops / dense.kernel_s / 1e9,
                    sparse_gflops=dense_flops / flop_ratio / sparse.kernel_s / 1e9,
                    sparse_top_other=sparse.top_other,
                )
            )
    return rows


def block_rows(runs: dict[str, Run], n: int, heads: int, head_dim: int, sparse_ns, modes):
    """Block table rows with the SDPA share of the dense block and the bound it implies."""
    dense = runs["dense"]
    share = dense.kernel_s / dense.median_s
    rows = []
    for mode in modes:
        for sparse_n in sparse_ns:
            sparse = runs[f"{mode} k={sparse_n}"]
            rows.append(
                dict(
                    tokens=n,
                    heads=heads,
                    head_dim=head_dim,
                    mode=mode,
                    sparse_n=sparse_n,
                    dense_ms=1e3 * dense.median_s,
                    sparse_ms=1e3 * sparse.median_s,
                    speedup=dense.median_s / sparse.median_s,
                    speedup_per_k=dense.median_s / sparse.median_s / sparse_n,
                    speedup_of_min=dense.min_s / sparse.min_s,
                    dense_sdpa_share=share,
                    bound_if_attention_free=1.0 / (1.0 - share),
                    kernel_only_speedup=dense.median_s / (dense.median_s - dense.kernel_s + sparse.kernel_s),
                    dense_kernel_ms=1e3 * dense.kernel_s,
                    sparse_kernel_ms=1e3 * sparse.kernel_s,
                )
            )
    return rows


def print_attention_table(rows) -> None:
    print(
        f"{'tokens':>6} {'d':>4} {'h':>2} {'mode':>6} {'k':>2} {'dense ms':>10} {'sparse ms':>10} "
        f"{'speed-up':>8} {'/ k':>5} {'min x':>5} {'FLOP x':>6} {'kernel x':>8}"
    )
    for r in rows:
        print(
            f"{r['tokens']:>6} {r['head_dim']:>4} {r['heads']:>2} {r['mode']:>6} {r['sparse_n']:>2} "
            f"{r['dense_ms']:>10.1f} {r['sparse_ms']:>10.1f} {r['speedup']:>8.2f} "
            f"{r['speedup_per_k']:>5.2f} {r['speedup_of_min']:>5.2f} {r['flop_ratio']:>6.2f} "
            f"{r['kernel_speedup']:>8.2f}"
        )


def print_block_table(rows) -> None:
    print(
        f"{'tokens':>6} {'width':>8} {'mode':>6} {'k':>2} {'dense ms':>10} {'sparse ms':>10} "
        f"{'speed-up':>8} {'/ k':>5} {'min x':>5} {'SDPA share':>10} {'if SDPA only':>12} {'cap':>5}"
    )
    for r in rows:
        width = f"{r['heads']}x{r['head_dim']}"
        print(
            f"{r['tokens']:>6} {width:>8} {r['mode']:>6} {r['sparse_n']:>2} {r['dense_ms']:>10.1f} "
            f"{r['sparse_ms']:>10.1f} {r['speedup']:>8.2f} {r['speedup_per_k']:>5.2f} "
            f"{r['speedup_of_min']:>5.2f} {100 * r['dense_sdpa_share']:>9.0f}% "
            f"{r['kernel_only_speedup']:>12.2f} {r['bound_if_attention_free']:>5.2f}"
        )


def why(attn_rows, blk_rows) -> list[str]:
    """Explanations computed from the measurements: speed-up = k x text x kernel x copies."""
    lines = [
        "Attention rows under 0.7 k, split into measured factors (medians over rounds):",
        "  speed-up = k x text x kernel x copies, where",
        "    text   = FLOP ratio / k: every sub-sequence also attends to the L text keys (exact, not measured);",
        "    kernel = SDPA-kernel speed-up / FLOP ratio: kernel efficiency at the shorter sub-sequence;",
        "    copies = speed-up / SDPA-kernel speed-up: time outside the kernel (pad, regroup, [video ; text]",
        "             cat, permutes, text repeat / mean and their backward; 'unattributed' is time in no op:",
        "             Python and the autograd engine). Time the process waits for a core lands in whichever",
        "             op is running, so on a loaded machine every factor carries that noise.",
    ]
    short = [r for r in attn_rows if r["speedup"] < 0.7 * r["sparse_n"]]
    factors = {
        "text": [r["flop_ratio"] / r["sparse_n"] for r in short],
        "kernel": [r["kernel_speedup"] / r["flop_ratio"] for r in short],
        "copies": [r["speedup"] / r["kernel_speedup"] for r in short],
    }
    for i, r in enumerate(short):
        text, kernel, copies = (factors[name][i] for name in factors)
        worst = min(
            ("text keys", text), ("kernel efficiency", kernel), ("copies", copies), key=lambda x: x[1]
        )
        top = ", ".join(f"{name} {1e3 * sec:.0f}" for name, sec in r["sparse_top_other"])
        lines += [
            f"  N={r['tokens']} d={r['head_dim']} {r['mode']} k={r['sparse_n']}: {r['speedup']:.2f}x = {r['sparse_n']} x text "
            f"{text:.2f} x kernel {kernel:.2f} x copies {copies:.2f}; largest loss: {worst[0]}",
            f"      SDPA {r['dense_gflops']:.0f} GFLOP/s at S={r['tokens'] + r['text_len']} (batch 1) vs "
            f"{r['sparse_gflops']:.0f} at S={r['sub_sequence']} (batch {r['sparse_n']}); other ops "
            f"{r['sparse_other_ops_ms']:.0f} ms sparse vs {r['dense_other_ops_ms']:.0f} dense (ms: {top}); "
            f"unattributed {r['sparse_unattributed_ms']:.0f} vs {r['dense_unattributed_ms']:.0f} ms",
        ]
    if not short:
        lines.append("  (none: every measured speed-up reached 0.7 k)")
    for name, values in factors.items():
        if values:
            lines.append(
                f"  {name:>6} factor over these {len(values)} rows: median {statistics.median(values):.2f}, "
                f"range {min(values):.2f}..{max(values):.2f}"
            )
    noisy = [r for r in attn_rows + blk_rows if abs(r["speedup_of_min"] / r["speedup"] - 1) > 0.25]
    if noisy:
        lines.append(
            f"  Noise: in {len(noisy)} of {len(attn_rows) + len(blk_rows)} rows the ratio of the fastest runs "
            "('min x') differs from the ratio of medians by more than 25%; read those to about +-25%."
        )
    for r in blk_rows[:1]:
        lines += [
            f"Block ({r['heads']}x{r['head_dim']}, N={r['tokens']}): SDPA is {100 * r['dense_sdpa_share']:.0f}% "
            "of the dense block's forward + backward; the rest (linears, FFN, norms, RoPE, AdaLN) does not",
            f"  shrink with k, so no block speed-up can exceed {r['bound_if_attention_free']:.2f}x even with free "
            "attention. 'if SDPA only' is the speed-up had only the kernel time changed; measured:",
            "  "
            + ", ".join(
                f"{b['mode']} k={b['sparse_n']} {b['speedup']:.2f}x (if SDPA only {b['kernel_only_speedup']:.2f}x)"
                for b in blk_rows
            ),
        ]
    return lines


def init_single_process() -> None:
    """One-process gloo group and megatron's parallel state (all sizes 1)."""
    if dist.is_initialized():  # already set up (the SUV block ran before the DiT block)
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    initialize_model_parallel(tiny_config())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="video tokens N")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--sparse-n", "--ks", dest="sparse_ns", type=int, nargs="+", default=[2, 4, 8], help="sparsities k"
    )
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--heads", type=int, default=None, help="default: max(threads, min(4, 16384 // N))")
    parser.add_argument("--text-len", type=int, default=64, help="text tokens L")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per shape, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block-tokens", type=int, default=4096)
    parser.add_argument("--block-heads", type=int, default=16)
    parser.add_argument("--block-head-dim", type=int, default=64)
    parser.add_argument("--no-block", action="store_true", help="skip the SUV block comparison")
    parser.add_argument("--dit-tokens", type=int, default=4096, help="video tokens of the v1.3 DiT block")
    parser.add_argument("--dit-heads", type=int, default=8, help="heads of the DiT block (the release: 24)")
    parser.add_argument(
        "--dit-head-dim", type=int, default=96, help="head dim of the DiT block (the release: 96)"
    )
    parser.add_argument(
        "--dit-sparse-n", type=int, nargs="+", default=[4], help="k of the DiT block (v1.3: 4)"
    )
    parser.add_argument("--no-dit-block", action="store_true", help="skip the v1.3 DiT block comparison")
    parser.add_argument(
        "--only-dit-block", action="store_true", help="run only the v1.3 DiT block comparison"
    )
    parser.add_argument("--quick", action="store_true", help="N=1024, d=64, k 2 4, 2 rounds: under a minute")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.head_dims, args.sparse_ns, args.repeats, args.heads = [1024], [64], [2, 4], 2, 2
        args.block_tokens, args.block_heads, args.block_head_dim = 1024, 2, 64
        args.dit_tokens, args.dit_heads = 1024, 2
    return args


def run_dit_block(args) -> list[dict]:
    """The v1.3 DiT block with Skiparse self-attention against the same weights dense, printed as a table."""
    init_single_process()
    n, h, d = args.dit_tokens, args.dit_heads, args.dit_head_dim
    runs = run_round_robin(
        dit_block_steps(n, args.text_len, h, d, args.dit_sparse_n, args.modes), args.repeats
    )
    rows = block_rows(runs, n, h, d, args.dit_sparse_n, args.modes)
    print(
        f"\nOpen-Sora-Plan v1.3 DiT block forward + backward, N={n}, L={args.text_len}, width D = {h} heads x "
        f"{d} = {h * d} (Skiparse self-attention k vs the same weights dense; cross-attention dense in both)"
    )
    print("  speed-up = dense / Skiparse block time; SDPA share = SDPA-kernel time / dense block time")
    print_block_table(rows)
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.only_dit_block:
        rows = run_dit_block(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(args=vars(args), dit_block=rows), f, indent=1)
        return
    start = time.perf_counter()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"fp32, SDPA backend, load average at start {os.getloadavg()[0]:.1f}"
    )
    heads_rule = f"{args.heads}" if args.heads else "max(threads, min(4, 16384 // N))"
    print(
        f"sizes: batch 1, video N in {args.tokens}, text L={args.text_len}, head dims {args.head_dims}, "
        f"heads {heads_rule}, k in {args.sparse_ns}, modes {args.modes}; "
        f"{args.repeats} timed rounds per shape after one warm-up run"
    )
    # 1. Warm-up: every attention variant once on a small shape (thread pool, kernel dispatch).
    for d in args.head_dims:
        for step in attention_steps(1024, args.text_len, 1, d, args.sparse_ns, args.modes).values():
            step()

    # 2. Attention: dense and every (mode, k) interleaved, shape by shape.
    attn_rows = []
    for n in args.tokens:
        heads = args.heads or max(args.threads, min(4, 16384 // n))
        for d in args.head_dims:
            steps = attention_steps(n, args.text_len, heads, d, args.sparse_ns, args.modes)
            runs = run_round_robin(steps, args.repeats)
            rows = attention_rows(runs, n, args.text_len, heads, d, args.sparse_ns, args.modes)
            attn_rows += rows
            peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(
                f"  measured N={n} d={d} h={heads}: dense {runs['dense'].median_s:.2f} s, "
                f"peak RSS so far {peak_gib:.2f} GiB, load average {os.getloadavg()[0]:.1f}, "
                f"elapsed {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    print("\nAttention forward + backward (joint_skiparse_attention, SDPA); speed-up = dense / sparse")
    print("  / k = speed-up / k; min x = dense / sparse of the fastest runs (less sensitive to other load)")
    print(
        "  FLOP x = nominal dense / sparse attention FLOPs (k, less the text keys); kernel x = SDPA-kernel time ratio"
    )
    print_attention_table(attn_rows)

    # 3. One SUV block with k against the same weights with k = 1.
    blk_rows = []
    if not args.no_block:
        init_single_process()
        n, h, d = args.block_tokens, args.block_heads, args.block_head_dim
        steps = block_steps(n, args.text_len, h, d, args.sparse_ns, args.modes)
        runs = run_round_robin(steps, args.repeats)
        blk_rows = block_rows(runs, n, h, d, args.sparse_ns, args.modes)
        print(
            f"\nSUV block forward + backward, N={n}, L={args.text_len}, width D = {h} heads x {d} = {h * d} "
            f"(block k vs the same weights at k = 1; each sparse block load_state_dict's the dense one)"
        )
        print("  SDPA share = SDPA-kernel time / dense block time; cap = 1 / (1 - share)")
        print_block_table(blk_rows)

    # 4. The v1.3 DiT block: Skiparse k = 4 against dense, same weights.
    dit_rows = [] if args.no_dit_block else run_dit_block(args)

    # 5. Why the speed-ups fall short of k, from the measurements above.
    print("\nWhy")
    for line in why(attn_rows, blk_rows):
        print(line)
    print(
        f"Elapsed {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.1f} "
        f"(other processes on this machine add noise; dense and sparse runs are interleaved)"
    )
    if args.json:
        meta = dict(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            args=vars(args),
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, attention=attn_rows, block=blk_rows, dit_block=dit_rows), f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
