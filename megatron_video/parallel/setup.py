"""Megatron process groups and the one place our config becomes a Megatron TransformerConfig."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from megatron_video.config.schema import ExperimentConfig
from megatron_video.errors import ConfigError
from megatron_video.parallel.plan import ParallelPlan

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_transformer_config(
    cfg: ExperimentConfig, use_cpu_initialization: bool | None = None
) -> TransformerConfig:
    """Megatron TransformerConfig carrying our parallel and precision settings into its linears.

    Precision: `params_dtype` (runtime.dtype) is the dtype of the tensor-parallel linears; the
    residual stream, norms, AdaLN and the timestep embedding stay fp32 (models/common/layers.py), so
    what crosses a pipeline stage boundary is fp32 (`pipeline_dtype`) in every run. fp16 is refused:
    it needs loss scaling, which the training loop does not do.

    Pipeline settings (PP > 1, see megatron_video/parallel/pipeline.py): stages exchange one packed
    tensor whose length depends on the boundary (variable_seq_lengths); under virtual pipelining the
    tensors go through Megatron's unbatched P2P path, which posts an activation before a gradient
    on both sides (the batched path swaps them on gloo with two pipeline ranks); the conditioning
    embedder is replicated on every chunk, so its gradients are summed over the pipeline group.
    """
    m, p, r = cfg.model, cfg.parallel, cfg.runtime
    if r.dtype == "fp16":
        raise ConfigError(
            "runtime.dtype=fp16 needs dynamic loss scaling, which the training loop does not do; "
            "use runtime.dtype=bf16 (or fp32)"
        )
    dtype = _DTYPES[r.dtype]
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=m.total_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.hidden_size * m.ff_mult,
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context_parallel,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=torch.float32,  # the residual stream, whatever params_dtype
        bf16=r.dtype == "bf16",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layernorm_epsilon=m.norm_eps,
        qk_layernorm=True,
        add_bias_linear=m.attention_bias,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
        init_method_std=m.init_std,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        variable_seq_lengths=p.pipeline_parallel > 1,
        # No experts here: Megatron only checks this setting to reject variable_seq_lengths with
        # its default 'allgather' MoE dispatcher.
        moe_token_dispatcher_type="alltoall",
        batch_p2p_comm=p.virtual_pipeline is None,
    )
    # Not a TransformerConfig field in megatron-core 0.16: finalize_model_grads reads it with getattr
    # and only then all-reduces the gradients of `pipeline_parallel=True` parameters over PP.
    config.has_cond_embedder = p.pipeline_parallel > 1
    return config


def initialize_model_parallel(cfg: ExperimentConfig) -> None:
    """Create megatron's TP / CP / PP / DP groups for an initialised default process group."""
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context_parallel,
    )


def build_parallel_plan(cfg: ExperimentConfig) -> ParallelPlan:
    """ParallelPlan over the initialised megatron groups, with the TransformerConfig for linears."""
    return ParallelPlan.from_parallel_state(build_transformer_config(cfg))
