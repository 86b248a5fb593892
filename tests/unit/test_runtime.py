"""Launcher environments are read the way torchrun and msrun set them."""

from __future__ import annotations

from megatron_video.data.batches import step_generators
from megatron_video.platform.launch import launcher_env


def test_torchrun_env(monkeypatch):
    for k, v in dict(
        RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="10.0.0.2", MASTER_PORT="6000"
    ).items():
        monkeypatch.setenv(k, v)
    assert launcher_env() == (3, 8, 1, "10.0.0.2", "6000")


def test_msrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    env = dict(RANK_ID="5", RANK_SIZE="16", DEVICE_ID="5", MS_SCHED_HOST="10.0.0.9", MS_SCHED_PORT="8118")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launcher_env() == (5, 16, 5, "10.0.0.9", "8119")


def test_single_process_defaults(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "RANK_ID", "MS_SCHED_HOST"):
        monkeypatch.delenv(k, raising=False)
    rank, world, local, addr, port = launcher_env()
    assert (rank, world, local, addr) == (0, 1, 0, "127.0.0.1") and int(port) > 0


def test_sample_generators_depend_on_position_not_split():
    a = [g.initial_seed() for g in step_generators(7, 3, range(0, 4))]
    b = [g.initial_seed() for g in step_generators(7, 3, range(2, 4))]
    assert a[2:] == b and len(set(a)) == 4
    assert a != [g.initial_seed() for g in step_generators(7, 4, range(0, 4))]
