"""Megatron process groups, the ParallelPlan built from them, and the one place our config becomes a
Megatron TransformerConfig.

`parallel.*` of the config is read here only: `setup_parallel` creates Megatron's groups for the
layout and returns the `ParallelPlan` (sizes, ranks, explicit groups, the TransformerConfig for the
linears) that models, trainer, checkpoints and sampling receive. This is the only module that reads
Megatron's global `parallel_state`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig

from megatron_video.config.schema import ExperimentConfig
from megatron_video.errors import ConfigError
from megatron_video.parallel.plan import ParallelPlan
from megatron_video.platform.launch import Runtime, seed_everything

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_transformer_config(
    cfg: ExperimentConfig, use_cpu_initialization: bool | None = None
) -> TransformerConfig:
    """Megatron TransformerConfig carrying our parallel and precision settings into its linears.

    Precision: `params_dtype` (runtime.dtype) is the dtype of the tensor-parallel linears; the
    residual stream, norms, AdaLN and the timestep embedding stay fp32 (models/common/layers.py), so
    what crosses a pipeline stage boundary is fp32 (`pipeline_dtype`) in every run. fp16 is refused:
    it needs loss scaling, which the training loop does not do (`ExperimentConfig.validate` refuses it).

    Pipeline settings (PP > 1, see megatron_video/parallel/pipeline.py): stages exchange one packed
    tensor whose length depends on the boundary (variable_seq_lengths); under virtual pipelining the
    tensors go through Megatron's unbatched P2P path, which posts an activation before a gradient
    on both sides (the batched path swaps them on gloo with two pipeline ranks); the conditioning
    embedder is replicated on every chunk, so its gradients are summed over the pipeline group.
    """
    m, p, r = cfg.model, cfg.parallel, cfg.runtime
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


def _rank_and_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def build_parallel_plan(cfg: ExperimentConfig) -> ParallelPlan:
    """ParallelPlan over the initialised megatron groups, with the TransformerConfig for linears."""
    linear_config = build_transformer_config(cfg)
    groups = ProcessGroupCollection.use_mpu_process_groups(
        required_pgs=["tp", "cp", "pp", "dp", "dp_cp", "tp_cp"]
    )
    tensor_parallel_rank, tensor_parallel = _rank_and_size(groups.tp)
    context_parallel_rank, context_parallel = _rank_and_size(groups.cp)
    pipeline_parallel_rank, pipeline_parallel = _rank_and_size(groups.pp)
    data_parallel_rank, data_parallel = _rank_and_size(groups.dp)
    return ParallelPlan(
        tensor_parallel=tensor_parallel,
        tensor_parallel_rank=tensor_parallel_rank,
        context_parallel=context_parallel,
        context_parallel_rank=context_parallel_rank,
        pipeline_parallel=pipeline_parallel,
        pipeline_parallel_rank=pipeline_parallel_rank,
        virtual_pipeline=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        data_parallel=data_parallel,
        data_parallel_rank=data_parallel_rank,
        sequence_parallel=bool(linear_config.sequence_parallel),
        tensor_parallel_group=groups.tp,
        context_parallel_group=groups.cp,
        pipeline_parallel_group=groups.pp,
        data_parallel_group=groups.dp,
        data_context_parallel_group=groups.dp_cp,
        tensor_context_parallel_group=groups.tp_cp,
        groups=groups,
        linear_config=linear_config,
        conditioning_config=dataclasses.replace(
            linear_config, sequence_parallel=False, params_dtype=torch.float32
        ),
    )


def setup_parallel(cfg: ExperimentConfig, runtime: Runtime) -> Runtime:
    """(Re)build megatron's groups for this stage's layout, seed every generator, and set
    `runtime.plan`.

    Seeds: Python, NumPy and torch with `training.seed + 100 x pipeline rank`, and Megatron's
    tensor-parallel RNG tracker from the same value.
    """
    p = cfg.parallel
    if runtime.world_size % p.model_parallel_size != 0:
        raise ConfigError(
            f"{runtime.world_size} processes cannot hold tensor x context x pipeline = {p.model_parallel_size} "
            "model-parallel ranks; change the parallel sizes or the number of processes"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    initialize_model_parallel(cfg)
    plan = build_parallel_plan(cfg)
    seed = cfg.training.seed + 100 * plan.pipeline_parallel_rank
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    runtime.plan = plan
    return runtime


def end_parallel() -> None:
    """Destroy megatron's groups (the default process group stays)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
