"""Single-process tests of the CPU adaptation for megatron-core (megatron_video.platform.megatron_cpu)."""

import pytest
import torch

from megatron_video.platform import megatron_cpu

SEED = 1234
# megatron's model-parallel stream is seeded with seed + 2718 + tp_rank (tensor_parallel/random.py).
TP_STREAM_OFFSET = 2718


@pytest.fixture
def adapted():
    """The adaptation applied for one test, then left as it was before."""
    was_applied = megatron_cpu.is_applied()
    megatron_cpu.apply_megatron_cpu_adaptation()
    yield
    if not was_applied:
        megatron_cpu.remove_megatron_cpu_adaptation()


@pytest.fixture
def not_adapted():
    """The adaptation removed for one test (a session fixture may have applied it), then restored."""
    was_applied = megatron_cpu.is_applied()
    megatron_cpu.remove_megatron_cpu_adaptation()
    yield
    megatron_cpu.remove_megatron_cpu_adaptation()
    if was_applied:
        megatron_cpu.apply_megatron_cpu_adaptation()


def _patched_attributes():
    import importlib

    from megatron.core.tensor_parallel import random as mcore_random

    return [
        (torch.cuda, "current_device"),
        (torch.cuda, "synchronize"),
        (torch.cuda, "empty_cache"),
        (torch.cuda, "get_rng_state"),
        (torch.cuda, "set_rng_state"),
        (torch.cuda, "manual_seed"),
        *((importlib.import_module(name), "torch") for name in megatron_cpu._MODULES_WITH_CUDA_FACTORIES),
        (torch.Tensor, "cuda"),
        (torch.Tensor, "type"),
        (mcore_random, "_get_cuda_rng_state"),
        (mcore_random, "_set_cuda_rng_state"),
        (mcore_random.CudaRNGStatesTracker, "fork"),
    ]


def test_version_check_accepts_installed_megatron_core():
    megatron_cpu.check_megatron_core_version()


def test_version_check_names_installed_and_supported_versions(monkeypatch):
    monkeypatch.setattr(megatron_cpu, "installed_megatron_core_version", lambda: "0.17.0")
    with pytest.raises(RuntimeError, match=r"supports megatron-core 0\.16\.x, but megatron-core 0\.17\.0"):
        megatron_cpu.check_megatron_core_version()
    # "0.160" is not a 0.16 release.
    monkeypatch.setattr(megatron_cpu, "installed_megatron_core_version", lambda: "0.160.0")
    with pytest.raises(RuntimeError, match="0.160.0"):
        megatron_cpu.check_megatron_core_version()


def test_apply_checks_version_first(not_adapted):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(megatron_cpu, "installed_megatron_core_version", lambda: "0.15.2")
        with pytest.raises(RuntimeError, match="0.15.2"):
            megatron_cpu.apply_megatron_cpu_adaptation()
    assert not megatron_cpu.is_applied()


def test_apply_refuses_when_cuda_is_available(not_adapted):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(RuntimeError, match="CUDA is available"):
            megatron_cpu.apply_megatron_cpu_adaptation()
        assert not megatron_cpu.is_applied()
        megatron_cpu.apply_megatron_cpu_adaptation(force=True)
    assert megatron_cpu.is_applied()


def test_apply_is_idempotent_and_remove_restores_exactly(not_adapted):

    attributes = _patched_attributes()
    before = [(owner, name, getattr(owner, name), name in vars(owner)) for owner, name in attributes]

    megatron_cpu.apply_megatron_cpu_adaptation()
    patched = [getattr(owner, name) for owner, name in attributes]
    assert megatron_cpu.is_applied()
    for (owner, name, original, _), now in zip(before, patched):
        assert now is not original, f"{owner}.{name} was not replaced"

    megatron_cpu.apply_megatron_cpu_adaptation()
    assert [getattr(owner, name) for owner, name in attributes] == patched, "second apply re-patched"
    assert len(megatron_cpu._registry) == len(attributes), "registry and the list above disagree"

    megatron_cpu.remove_megatron_cpu_adaptation()
    assert not megatron_cpu.is_applied()
    for owner, name, original, in_dict in before:
        assert getattr(owner, name) is original, f"{owner}.{name} not restored"
        assert (name in vars(owner)) == in_dict, f"{owner}.{name} left in the class dict"
    megatron_cpu.remove_megatron_cpu_adaptation()  # a second remove is harmless


def test_patches_act_only_for_megatron_callers(adapted):
    from megatron.core import utils as mcore_utils

    # Called from here (not megatron), torch behaves as without the adaptation
    # (a CPU build of torch raises AssertionError "Torch not compiled with CUDA enabled").
    with pytest.raises((RuntimeError, AssertionError)):
        torch.cuda.current_device()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(2, device="cuda")
    assert torch.ones(2).type() == "torch.FloatTensor"
    # megatron's global buffer (utils.py, device=torch.cuda.current_device()) lands on the CPU ...
    buffer = mcore_utils.GlobalMemoryBuffer().get_tensor((3, 4), torch.float32, "test")
    assert buffer.device.type == "cpu" and buffer.shape == (3, 4)
    # ... and so does its l2 norm fallback (utils.py, torch.tensor(..., device="cuda")).
    norm, _ = mcore_utils.local_multi_tensor_l2_norm(0, None, [[torch.full((4,), 3.0), torch.ones(9)]], False)
    assert norm.device.type == "cpu" and norm.item() == pytest.approx(45.0**0.5)


def test_torchscript_still_compiles_torch_factories(adapted):
    @torch.jit.script
    def scripted(x: torch.Tensor) -> torch.Tensor:
        return x + torch.zeros(3) + torch.ones_like(x)

    assert torch.equal(scripted(torch.ones(3)), torch.full((3,), 2.0))


def test_tracker_fork_uses_its_own_generator(adapted):
    from megatron.core import tensor_parallel

    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    default_state = torch.get_rng_state()

    with tracker.fork():
        dropped = torch.nn.functional.dropout(torch.ones(64), p=0.5)
        first = torch.rand(64)
    assert torch.equal(torch.get_rng_state(), default_state), "fork changed the default stream"
    with tracker.fork():
        second = torch.rand(64)
    outside = torch.rand(64)

    # Inside fork: the model-parallel stream seeded with SEED + 2718 + tp_rank, continued across forks.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + TP_STREAM_OFFSET)
        assert torch.equal(dropped, torch.nn.functional.dropout(torch.ones(64), p=0.5))
        assert torch.equal(first, torch.rand(64))
        assert torch.equal(second, torch.rand(64))
    # Outside: the default stream, untouched by the forks.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        assert torch.equal(outside, torch.rand(64))
    assert not torch.equal(first[:8], outside[:8])


def test_recompute_restores_forked_and_default_streams(adapted):
    from megatron.core import tensor_parallel

    def block(x):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            x = torch.nn.functional.dropout(x, p=0.5)
        return torch.nn.functional.dropout(x * 2.0, p=0.5)

    grads = []
    for recompute in (False, True):
        torch.manual_seed(SEED)
        tensor_parallel.model_parallel_cuda_manual_seed(SEED, tp_rank=0, ep_rank=0, etp_rank=0)
        x = torch.ones(256, requires_grad=True)
        y = tensor_parallel.checkpoint(block, False, x) if recompute else block(x)
        torch.rand(8)  # advance the default stream between forward and backward
        with tensor_parallel.get_cuda_rng_tracker().fork():
            torch.rand(8)  # and the forked one
        y.sum().backward()
        grads.append(x.grad)
    assert 0 < (grads[0] != 0).sum() < 256, "dropout masks are degenerate"
    assert torch.equal(grads[0], grads[1])
