"""megatron-core on CPU + gloo with the CPU adaptation: 2-process parity with single-process fp32.

Each test is one launch of 2 processes, each importing megatron (several seconds per launch), so a
launch runs several checks. The workers compute results and single-process references from the same
weights and data; the parent asserts.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_video.testing.distributed import init_megatron_parallel, run_distributed

pytestmark = pytest.mark.distributed

SEED = 1234
RTOL, ATOL = 1e-4, 1e-5
# megatron's model-parallel stream is seeded with seed + 2718 + tp_rank (tensor_parallel/random.py).
TP_STREAM_OFFSET = 2718
SEQ, BATCH, HIDDEN, FFN = 8, 2, 8, 16


def _gather(shard: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate the shards of all ranks of `group` along `dim`."""
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim)


def _mlp_weights():
    """Full fp32 weights, input and output gradient of a GELU MLP, identical on every rank."""
    gen = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(SEQ, BATCH, HIDDEN, generator=gen),
        "w1": 0.3 * torch.randn(FFN, HIDDEN, generator=gen),
        "b1": 0.1 * torch.randn(FFN, generator=gen),
        "w2": 0.3 * torch.randn(HIDDEN, FFN, generator=gen),
        "b2": 0.1 * torch.randn(HIDDEN, generator=gen),
        "dy": torch.randn(SEQ, BATCH, HIDDEN, generator=gen),
    }


def _tp_mlp(sequence_parallel: bool):
    """ColumnParallelLinear -> GELU -> RowParallelLinear holding this rank's shards of _mlp_weights()."""
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    config = ModelParallelConfig(
        tensor_model_parallel_size=2, sequence_parallel=sequence_parallel, params_dtype=torch.float32
    )
    init = torch.nn.init.zeros_  # runs on the CPU under the RNG tracker; overwritten below
    col = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=init, bias=True, gather_output=False)
    row = RowParallelLinear(
        FFN, HIDDEN, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
    )
    rank = parallel_state.get_tensor_model_parallel_rank()
    full = _mlp_weights()
    with torch.no_grad():
        col.weight.copy_(full["w1"].chunk(2, dim=0)[rank])
        col.bias.copy_(full["b1"].chunk(2, dim=0)[rank])
        row.weight.copy_(full["w2"].chunk(2, dim=1)[rank])
        row.bias.copy_(full["b2"])
    return col, row


def _mlp_parity(sequence_parallel: bool) -> dict:
    """(tensor-parallel, single-process) pairs: output, input grad and full-weight grads."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    full = _mlp_weights()

    ref = {name: full[name].clone().requires_grad_() for name in ("x", "w1", "b1", "w2", "b2")}
    y_ref = F.gelu(ref["x"] @ ref["w1"].T + ref["b1"]) @ ref["w2"].T + ref["b2"]
    (y_ref * full["dy"]).sum().backward()

    col, row = _tp_mlp(sequence_parallel)
    # With sequence parallelism each rank holds a slice of the sequence (dim 0) in and out.
    local = (lambda t: t.chunk(2, dim=0)[rank]) if sequence_parallel else (lambda t: t)
    x = local(full["x"]).clone().requires_grad_()
    hidden, _ = col(x)
    y, _ = row(F.gelu(hidden))
    (y * local(full["dy"])).sum().backward()
    if sequence_parallel:
        # What finalize_model_grads does for parameters tagged sequence_parallel (the row bias).
        assert row.bias.sequence_parallel
        dist.all_reduce(row.bias.grad, group=tp_group)

    return {
        "y": (y, local(y_ref)),
        "x.grad": (x.grad, local(ref["x"].grad)),
        "w1.grad": (_gather(col.weight.grad, 0, tp_group), ref["w1"].grad),
        "b1.grad": (_gather(col.bias.grad, 0, tp_group), ref["b1"].grad),
        "w2.grad": (_gather(row.weight.grad, 1, tp_group), ref["w2"].grad),
        "b2.grad": (row.bias.grad, ref["b2"].grad),
    }


def _recompute_pairs() -> dict:
    """(no recompute, tensor_parallel.checkpoint) pairs of a TP MLP with dropout inside and outside fork()."""
    from megatron.core import tensor_parallel

    col, row = _tp_mlp(sequence_parallel=False)

    def block(x):
        hidden, _ = col(x)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            hidden = F.dropout(hidden, p=0.3)  # TP-sharded activations: per-rank stream
        y, _ = row(F.gelu(hidden))
        return F.dropout(y, p=0.3)  # replicated activations: default stream

    runs = []
    for recompute in (False, True):
        torch.manual_seed(SEED)
        tensor_parallel.model_parallel_cuda_manual_seed(SEED)
        for param in (*col.parameters(), *row.parameters()):
            param.grad = None
        x = _mlp_weights()["x"].requires_grad_()
        y = tensor_parallel.checkpoint(block, False, x) if recompute else block(x)
        # Move both streams on, so that a recompute without RNG restore would draw other masks.
        torch.rand(16)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            torch.rand(16)
        (y * _mlp_weights()["dy"]).sum().backward()
        runs.append([y.detach(), x.grad, col.weight.grad, col.bias.grad, row.weight.grad, row.bias.grad])
    names = ["y", "x.grad", "w1.grad", "b1.grad", "w2.grad", "b2.grad"]
    return {name: (plain, recomputed) for name, plain, recomputed in zip(names, *runs)}


def _dropout_masks(rank: int) -> dict:
    """Dropout masks drawn inside and outside the tracker's fork() after identical seeding."""
    from megatron.core import tensor_parallel

    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED)
    default_state = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        in_fork = F.dropout(torch.ones(256), p=0.5)
    default_unchanged = torch.equal(default_state, torch.get_rng_state())
    outside = F.dropout(torch.ones(256), p=0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + TP_STREAM_OFFSET + rank)
        expected_in_fork = F.dropout(torch.ones(256), p=0.5)
    return {
        "in_fork": in_fork,
        "expected_in_fork": expected_in_fork,
        "outside": outside,
        "default_unchanged": default_unchanged,
    }


def _checkpoint_round_trip(rank: int, ckpt_dir: str) -> dict:
    """Save a TP=2 row-sharded tensor with dist_checkpointing; load it row- and column-sharded."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    full = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    state = {
        "w": ShardedTensor.from_rank_offsets("w", full.chunk(2, dim=0)[rank].clone(), (0, rank, 2)),
        "step": 7,
    }
    dist_checkpointing.save(state, ckpt_dir)
    same = dist_checkpointing.load(
        {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4, 6), (0, rank, 2)), "step": 0}, ckpt_dir
    )
    resharded = dist_checkpointing.load(
        {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(8, 3), (1, rank, 2))}, ckpt_dir
    )
    return {
        "same": (same["w"], full.chunk(2, dim=0)[rank]),
        "resharded": (resharded["w"], full.chunk(2, dim=1)[rank]),
        "step": same["step"],
    }


def _tensor_parallel_worker(rank: int, world_size: int, ckpt_dir: str) -> dict:
    from megatron.core import tensor_parallel

    init_megatron_parallel(tp=2, seed=SEED)
    received = tensor_parallel.broadcast_data(
        ["a"], {"a": torch.arange(6).reshape(2, 3) + 100 * rank}, torch.int64
    )["a"]
    return {
        "mlp": _mlp_parity(sequence_parallel=False),
        "mlp_sp": _mlp_parity(sequence_parallel=True),
        "recompute": _recompute_pairs(),
        "dropout": _dropout_masks(rank),
        "broadcast": received,
        "checkpoint": _checkpoint_round_trip(rank, ckpt_dir),
    }


def test_tensor_parallel_rng_recompute_and_checkpoint_on_cpu(tmp_path):
    results = run_distributed(_tensor_parallel_worker, 2, str(tmp_path))

    for rank, result in enumerate(results):
        # Column -> Row parallel MLP, TP=2, without and with sequence parallelism.
        for variant in ("mlp", "mlp_sp"):
            for name, (actual, expected) in result[variant].items():
                torch.testing.assert_close(
                    actual,
                    expected,
                    rtol=RTOL,
                    atol=ATOL,
                    msg=lambda m, v=variant, n=name, r=rank: f"{v} {n} rank {r}: {m}",
                )
        # Recompute reproduces outputs and grads bit for bit.
        for name, (plain, recomputed) in result["recompute"].items():
            assert torch.equal(plain, recomputed), f"recompute changed {name} on rank {rank}"
        # tensor_parallel.broadcast_data sends TP rank 0's tensor.
        assert torch.equal(result["broadcast"], torch.arange(6).reshape(2, 3))
        # dist_checkpointing save + load (same sharding and resharded) on gloo.
        checkpoint = result["checkpoint"]
        assert torch.equal(*checkpoint["same"]) and torch.equal(*checkpoint["resharded"])
        assert checkpoint["step"] == 7
        # Inside fork() dropout follows this rank's model-parallel stream; the default stream is kept.
        dropout = result["dropout"]
        assert torch.equal(dropout["in_fork"], dropout["expected_in_fork"])
        assert dropout["default_unchanged"]

    masks = [result["dropout"] for result in results]
    assert not torch.equal(masks[0]["in_fork"], masks[1]["in_fork"]), (
        "fork() gave the same mask on both TP ranks"
    )
    assert torch.equal(masks[0]["outside"], masks[1]["outside"]), (
        "same seed gave different masks outside fork()"
    )


def _data_parallel_results(rank: int, steps: int, lr: float, weight_decay: float) -> dict:
    """Megatron DDP + distributed optimizer over DP=2 vs torch AdamW on the concatenated batch."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer import TransformerConfig

    init_megatron_parallel(seed=SEED)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    reference = copy.deepcopy(net)

    config = TransformerConfig(num_layers=1, hidden_size=12, num_attention_heads=1)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config, ddp_config, net)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=weight_decay, clip_grad=1.0, use_distributed_optimizer=True
        ),
        [model],
    )
    # megatron applies its per-group weight decay (none for biases and 1-D params) through the
    # scheduler; without one, every parameter would be decayed.
    OptimizerParamScheduler(
        optimizer, lr, lr, lr, 0, steps, "constant", weight_decay, weight_decay, steps, "constant"
    )
    ref_optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in reference.parameters() if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in reference.parameters() if p.dim() == 1], "weight_decay": 0.0},
        ],
        lr=lr,
    )

    gen = torch.Generator().manual_seed(1)
    grad_norms, ref_grad_norms = [], []
    for _ in range(steps):
        inputs, targets = torch.randn(8, 6, generator=gen), 5.0 * torch.randn(8, 4, generator=gen)

        model.zero_grad_buffer()
        optimizer.zero_grad()
        F.mse_loss(model(inputs.chunk(2)[rank]), targets.chunk(2)[rank]).backward()
        model.finish_grad_sync()
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful
        grad_norms.append(grad_norm)

        ref_optimizer.zero_grad()
        F.mse_loss(reference(inputs), targets).backward()
        ref_grad_norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0).item())
        ref_optimizer.step()

    parallel_state.destroy_model_parallel()
    return {
        "params": [p.detach().clone() for p in net.parameters()],
        "ref_params": [p.detach().clone() for p in reference.parameters()],
        "grad_norms": grad_norms,
        "ref_grad_norms": ref_grad_norms,
    }


class _PipelineStage(torch.nn.Module):
    """tanh(Linear(x)) on the batch (first stage) or on the activation received from the previous stage."""

    def __init__(self, config, weight: torch.Tensor, bias: torch.Tensor):
        from megatron.core.enums import ModelType

        super().__init__()
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.linear = torch.nn.Linear(HIDDEN, HIDDEN)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.input_tensor = None

    def set_input_tensor(self, input_tensor: list) -> None:
        self.input_tensor = input_tensor[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x if self.input_tensor is None else self.input_tensor))


def _pipeline_parallel_results(rank: int, num_microbatches: int) -> dict:
    """Two-stage pipeline (1F1B schedule over gloo p2p) vs the same two layers in one process."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    init_megatron_parallel(pp=2, seed=SEED)
    gen = torch.Generator().manual_seed(2)
    weights = [
        (0.5 * torch.randn(HIDDEN, HIDDEN, generator=gen), 0.1 * torch.randn(HIDDEN, generator=gen))
        for _ in range(2)
    ]
    microbatches = [
        (torch.randn(SEQ, BATCH, HIDDEN, generator=gen), torch.randn(SEQ, BATCH, HIDDEN, generator=gen))
        for _ in range(num_microbatches)
    ]

    config = TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=1,
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
    )
    stage = _PipelineStage(config, *weights[rank])

    def forward_step(data_iterator, model):
        inputs, targets = next(data_iterator)

        def loss_func(output):
            loss = F.mse_loss(output, targets)
            # clone: the schedule divides the returned loss in place by num_microbatches
            return loss, {"loss": loss.detach().clone()}

        return model(inputs), loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[stage],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=BATCH,
    )

    reference = [_PipelineStage(config, *w) for w in weights]
    ref_losses = []
    for inputs, targets in microbatches:
        loss = F.mse_loss(reference[1](reference[0](inputs)), targets)
        (loss / num_microbatches).backward()
        ref_losses.append(loss.detach())
    return {
        "losses": [entry["loss"] for entry in losses] if rank == 1 else None,
        "ref_losses": ref_losses,
        "grads": [stage.linear.weight.grad, stage.linear.bias.grad],
        "ref_grads": [reference[rank].linear.weight.grad, reference[rank].linear.bias.grad],
    }


def _data_and_pipeline_parallel_worker(
    rank: int, world_size: int, steps: int, lr: float, weight_decay: float
) -> dict:
    return {
        "dp": _data_parallel_results(rank, steps, lr, weight_decay),
        "pp": _pipeline_parallel_results(rank, num_microbatches=3),
    }


def test_ddp_distributed_optimizer_and_pipeline_match_single_process_on_cpu():
    results = run_distributed(_data_and_pipeline_parallel_worker, 2, steps=2, lr=0.05, weight_decay=0.1)

    dp = [result["dp"] for result in results]
    for rank, result in enumerate(dp):
        assert max(result["ref_grad_norms"]) > 1.0, "gradient clipping was not exercised"
        assert result["grad_norms"] == pytest.approx(result["ref_grad_norms"], rel=RTOL)
        for index, (param, ref_param) in enumerate(zip(result["params"], result["ref_params"])):
            torch.testing.assert_close(
                param,
                ref_param,
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, i=index, r=rank: f"param {i} rank {r}: {m}",
            )
    for param_0, param_1 in zip(dp[0]["params"], dp[1]["params"]):
        assert torch.equal(param_0, param_1), "data-parallel ranks ended with different parameters"

    pp = [result["pp"] for result in results]
    torch.testing.assert_close(
        torch.stack(pp[1]["losses"]), torch.stack(pp[1]["ref_losses"]), rtol=RTOL, atol=ATOL
    )
    for rank, result in enumerate(pp):
        for name, grad, ref_grad in zip(("weight", "bias"), result["grads"], result["ref_grads"]):
            torch.testing.assert_close(
                grad, ref_grad, rtol=RTOL, atol=ATOL, msg=lambda m, n=name, r=rank: f"stage {r} {n}.grad: {m}"
            )
