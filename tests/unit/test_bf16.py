"""runtime.dtype=bf16: which weights are bf16, fp32 streams / norms / AdaLN, closeness to fp32, training.

bf16 keeps 8 mantissa bits (relative rounding up to 2^-9 ~ 2e-3). Over the tiny model's 10 blocks
the bf16 model's output differs from the fp32 model's with the same weights by about 3e-3 (relative
L2) and all gradients together by about 4e-3 (measured); the checks allow 1.5e-2 and 2e-2. The fp32
path itself is unchanged bit for bit (tests/unit/test_open_sora_plan_fidelity.py and the fp32
parity tests hold it to the released model and to one process).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from megatron_video.errors import ConfigError
from megatron_video.models.common.layers import (
    AdaLNModulation,
    LayerNormFP32,
    RMSNorm,
    TimestepTextEmbedding,
    TokenLinear,
)
from megatron_video.models.suv.model import SUVBlock
from megatron_video.testing.models import build_model, random_inputs, randomize, tiny_config

# Parameters that are bf16 under runtime.dtype=bf16: the attention and FFN linears (Megatron's
# tensor-parallel layers) and the token-wise U-skip and inpainting linears. Everything else is fp32.
BF16_PARAMS = re.compile(
    r"(\.attn\.linear_(added_)?(qkv|proj)|\.ff(_text)?\.linear_fc[12]|^skip_linears(_text)?\.\d+"
    r"|^inpaint\.(masked_video|mask)_proj)\.(weight|bias)$"
)
INPAINT = 4  # I2V mask channels: the inpainting embeddings are covered too
SHAPE = dict(batch=2, frames=2, height=4, width=6, text_len=8)


def _config(dtype: str, **model):
    cfg = tiny_config(**model)
    cfg.runtime.dtype = dtype
    return cfg


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_weights_are_the_transformer_matmuls(megatron_single):
    model = build_model(_config("bf16", skip_connection_zero_init=False), inpaint_mask_channels=INPAINT)
    bf16_elements = total = 0
    for name, p in model.named_parameters():
        expected = torch.bfloat16 if BF16_PARAMS.search(name) else torch.float32
        assert p.dtype == expected, (name, p.dtype)
        total += p.numel()
        bf16_elements += p.numel() if p.dtype == torch.bfloat16 else 0
    # Most weights (about 86% of the 8.5B model: the fp32 AdaLN linears are 4 D^2 of every block's 28 D^2).
    assert bf16_elements > 0.5 * total
    # The same rule by module type.
    for module in model.modules():
        if isinstance(module, (LayerNormFP32, RMSNorm, TimestepTextEmbedding)):
            assert all(p.dtype == torch.float32 for p in module.parameters()), type(module)
        if isinstance(module, AdaLNModulation):
            assert module.linear.weight.dtype == torch.float32
        if isinstance(module, TokenLinear):
            assert module.weight.dtype == torch.bfloat16
    plan = model.plan
    assert plan.linear_config.params_dtype == torch.bfloat16 and plan.linear_config.bf16
    assert plan.conditioning_config.params_dtype == torch.float32
    assert plan.linear_config.pipeline_dtype == torch.float32  # the residual stream crosses stages

    fp32 = build_model(_config("fp32"), inpaint_mask_channels=INPAINT)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}


def test_residual_streams_norms_and_modulation_are_fp32(megatron_single):
    cfg = _config("bf16", skip_connection_zero_init=False)
    model = build_model(cfg, inpaint_mask_channels=INPAINT)
    randomize(model, seed=1)
    seen: dict[str, set] = {}

    def note(key, *tensors):
        seen.setdefault(key, set()).update(t.dtype for t in tensors if torch.is_tensor(t))

    def on_block(module, args, out):
        note("block in", args[0], args[1])
        note("block out", *out)

    def on_rms_norm(module, args, out):
        # Computed in fp32 and rounded once: exactly the fp32 formula cast to bf16.
        (x,) = args
        xf = x.float()
        ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight
        assert torch.equal(out, ref.to(x.dtype))
        note("qk-norm in", x)

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, SUVBlock):
            hooks.append(module.register_forward_hook(on_block))
        elif isinstance(module, RMSNorm):
            hooks.append(module.register_forward_hook(on_rms_norm))
        elif isinstance(module, LayerNormFP32):
            hooks.append(module.register_forward_hook(lambda m, a, o: note("layernorm", a[0], o)))
        elif isinstance(module, (AdaLNModulation, TimestepTextEmbedding)):
            hooks.append(module.register_forward_hook(lambda m, a, o: note("conditioning", *a, *o)))
        elif isinstance(module, TokenLinear):
            hooks.append(module.register_forward_hook(lambda m, a, o: note("token linear", a[0], o)))
        elif re.search(r"\.(linear_qkv|linear_added_qkv|linear_fc1)$", name):
            hooks.append(module.register_forward_pre_hook(lambda m, a: note("matmul in", a[0])))
    inputs = random_inputs(cfg, **SHAPE, seed=2, inpaint_mask_channels=INPAINT)
    out = model(**inputs)
    for h in hooks:
        h.remove()

    assert out.dtype == torch.float32
    assert seen["block in"] == seen["block out"] == {torch.float32}  # video and text streams
    assert seen["layernorm"] == {torch.float32}
    assert seen["conditioning"] == {torch.float32}  # timestep embedding, AdaLN shift / scale / gate
    assert seen["token linear"] == {torch.float32}  # fp32 in and out, bf16 weights
    assert seen["matmul in"] == {torch.bfloat16}
    assert seen["qk-norm in"] == {torch.bfloat16}


def test_bf16_forward_and_gradients_close_to_fp32(megatron_single):
    ref_model = build_model(_config("fp32"), inpaint_mask_channels=INPAINT)
    state = randomize(ref_model, seed=3)
    model = build_model(_config("bf16"), inpaint_mask_channels=INPAINT)
    model.load_state_dict(state, strict=False)
    inputs = random_inputs(_config("fp32"), **SHAPE, seed=4, inpaint_mask_channels=INPAINT)
    target = torch.randn(2, 8, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    outs, grads = [], []
    for m in (ref_model, model):
        out = m(**inputs)
        ((out - target) ** 2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.float() for n, p in m.named_parameters()})

    out_err = _relative(outs[1], outs[0])
    flat = [torch.cat([g[n].flatten() for n in sorted(g)]) for g in grads]
    grad_err = _relative(flat[1], flat[0])
    print(f"bf16 vs fp32, relative L2: output {out_err:.2e}, gradients {grad_err:.2e}")
    assert 1e-4 < out_err < 1.5e-2  # bf16 is really used, and close
    assert grad_err < 2e-2
    for name, g in grads[0].items():
        if g.norm() > 0:
            assert _relative(grads[1][name], g) < 1e-1, name

    # Inputs of any float dtype are cast on entry: bf16 text features (a bf16 text encoder) give
    # what their fp32 values give, in the fp32 model as in the bf16 one.
    rounded = {**inputs, "text_BLC": inputs["text_BLC"].bfloat16()}
    as_fp32 = {**inputs, "text_BLC": rounded["text_BLC"].float()}
    with torch.no_grad():
        for m in (ref_model, model):
            assert torch.equal(m(**rounded), m(**as_fp32))


class _Repeat:
    """The same `n` fixed samples every step (so the loss can go down); micro-batches of `mbs`."""

    def __init__(self, cfg, mbs: int, n: int = 2):
        from megatron_video.data.batches import TrainBatch

        m, g = cfg.model, torch.Generator().manual_seed(0)
        x0 = torch.randn(n, m.in_channels, 2, 4, 6, generator=g)
        cond = {
            "text_BLC": torch.randn(n, 8, m.caption_channels, generator=g),
            "pooled_BP": torch.randn(n, m.pooled_projection_dim, generator=g),
        }
        self.batches = [
            TrainBatch(x0[i : i + mbs], {k: v[i : i + mbs] for k, v in cond.items()})
            for i in range(0, n, mbs)
        ]
        self.i = 0

    def next_batch(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


def _train(dtype: str, state: dict, steps: int):
    """Trainer steps at DP = 1 from `state`; losses, the loss of a fixed draw before / after, trainer."""
    from megatron_video.data.batches import step_generators
    from megatron_video.parallel.setup import build_parallel_plan
    from megatron_video.platform.launch import Runtime
    from megatron_video.training.loop import Trainer

    cfg = _config(dtype, caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
    t = cfg.training
    t.global_batch_size = t.micro_batch_size = 2
    t.optimizer.lr, t.optimizer.warmup_steps, t.ema_decay = 1e-3, 0, 0.9
    runtime = Runtime(torch.device("cpu"), 0, 1, 0, plan=build_parallel_plan(cfg))
    model = build_model(cfg)
    model.load_state_dict(state, strict=False)
    trainer = Trainer(cfg, runtime, model)
    source = _Repeat(cfg, mbs=2)

    @torch.no_grad()
    def fixed_loss():
        batch = source.batches[0]
        gens = step_generators(123, 0, range(2))
        return trainer.objective.training_loss(model, batch.x0_BCTHW, batch.cond, gens).item()

    before = fixed_loss()
    losses = [trainer.train_step(source)["loss"] for _ in range(steps)]
    return losses, before, fixed_loss(), trainer


def test_bf16_training_follows_fp32_with_fp32_main_params(megatron_single):
    from megatron.core.optimizer import DistributedOptimizer

    from megatron_video.training.export import main_params

    cfg = _config("fp32", caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
    state = randomize(build_model(cfg), seed=6, std=0.05)
    steps = 4
    ref_losses, ref_before, ref_after, _ = _train("fp32", state, steps)
    losses, before, after, trainer = _train("bf16", state, steps)

    # The same loss curve within bf16 round-off, and the same progress on a fixed draw.
    for a, b in zip(ref_losses, losses):
        assert b == pytest.approx(a, rel=1e-3)
    assert ref_after < ref_before and after < before
    assert (before - after) == pytest.approx(ref_before - ref_after, rel=0.1)

    # Megatron's distributed optimizer (used for every bf16 run, DP = 1 included): fp32 main
    # parameters, the bf16 model weights are those rounded; the EMA and the export are fp32 and come
    # from full-precision values.
    parts = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    assert all(isinstance(part, DistributedOptimizer) for part in parts)
    exported = main_params(trainer.model, trainer.optimizer)
    more_precise = 0
    for name, p in trainer.model.named_parameters():
        assert exported[name].dtype == torch.float32
        if p.dtype == torch.bfloat16:
            assert torch.equal(p, exported[name].to(torch.bfloat16)), name
            more_precise += int(not torch.equal(exported[name], p.float()))
        else:
            assert torch.equal(exported[name], p)
    assert more_precise > 0
    assert {t.dtype for t in trainer.ema.shadow.values()} == {torch.float32}


def test_fp32_export_loads_into_a_bf16_model(megatron_single):
    from megatron_video.training.export import gather_full_state_dict, load_full_into

    full = randomize(build_model(_config("fp32")), seed=7)
    model = build_model(_config("bf16"))
    assert load_full_into(model, model.plan, full) == []
    for name, p in model.named_parameters():
        assert torch.equal(p, full[name].to(p.dtype)), name  # rounded to nearest
    exported = gather_full_state_dict(model, model.plan)
    assert {t.dtype for t in exported.values()} == {torch.float32}


def test_fp16_is_refused_before_launch():
    from megatron_video.config import load_config

    with pytest.raises(ConfigError, match="runtime.dtype=fp16"):
        load_config(
            Path(__file__).parents[2] / "examples" / "tiny" / "t2v.yaml",
            ["runtime.dtype=fp16", "data.data_list=null"],
        )


def test_resume_with_another_dtype_names_the_change(megatron_single, tmp_path):
    from megatron_video.training import checkpoint as ckpt

    cfg = _config("fp32", caption_channels=32, pooled_projection_dim=24, timestep_embed_dim=32)
    state = randomize(build_model(cfg), seed=6, std=0.05)
    _, _, _, saved = _train("bf16", state, 1)
    ckpt.save_checkpoint(
        tmp_path, 1, saved.model_chunks, saved.optimizer, saved.scheduler, saved.train_state()
    )
    _, _, _, other = _train("fp32", state, 1)
    with pytest.raises(ckpt.CheckpointMismatchError, match="runtime.dtype changed"):
        ckpt.load_checkpoint(tmp_path, other.model_chunks, other.optimizer, other.scheduler)
