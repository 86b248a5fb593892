"""Pre-emption and the processes of a run, as a cluster delivers them, through torchrun.

- SIGTERM to torchrun alone (it forwards SIGTERM to each worker's process group) and SIGTERM to
  every process of the run at once (what Slurm does), both after a periodic save: the workers finish
  the step, save it, exit 0, and a re-run resumes with bitwise equal losses.
- SIGKILL of torchrun alone: no worker (or helper) outlives it by more than a few seconds.
- A second run pointed at a save dir in use is refused; a wrong load_dir fails before training
  with the save dir untouched.
"""

from __future__ import annotations

import hashlib
import signal
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import STEPS, Launch, assert_resumes_exactly, logged_losses, run, t2v_command

pytestmark = pytest.mark.e2e


def _preempt_after_periodic_save(stage: Path, demo_data, log: Path, port: int, deliver) -> int:
    """Start a run, deliver the signal once step 3 is logged (step 2 is saved); return the saved step."""
    launch = Launch(t2v_command(stage, demo_data, STEPS, port), log)
    try:
        launch.wait_for(lambda: 3 in logged_losses(stage))
        deliver(launch)
        launch.wait()
        assert launch.wait_until_gone() == [], "a process of the run outlived the pre-emption"
    finally:
        launch.kill_everything()
    out = launch.output()
    assert "pre-empted by SIGTERM: saved step" in out, out[-3000:]
    saved = int((stage / "checkpoints" / "latest").read_text())
    assert saved == max(logged_losses(stage)) and 3 <= saved < STEPS, (saved, out[-2000:])
    assert not [p for p in (stage / "checkpoints").iterdir() if ".tmp-" in p.name]
    return saved


def test_sigterm_to_torchrun_saves_the_reached_step_and_resumes_exactly(
    demo_data, tmp_path, reference_losses
):
    stage = tmp_path / "t2v"
    _preempt_after_periodic_save(
        stage, demo_data, tmp_path / "run.log", 29641, lambda launch: launch.signal_launcher(signal.SIGTERM)
    )
    assert_resumes_exactly(stage, demo_data, reference_losses, 29642)


def test_sigterm_to_every_process_saves_the_reached_step_and_resumes_exactly(
    demo_data, tmp_path, reference_losses
):
    stage = tmp_path / "t2v"
    _preempt_after_periodic_save(
        stage, demo_data, tmp_path / "run.log", 29643, lambda launch: launch.signal_all(signal.SIGTERM)
    )
    assert_resumes_exactly(stage, demo_data, reference_losses, 29644)


def test_sigkill_of_torchrun_leaves_no_worker_and_the_save_dir_is_free_again(demo_data, tmp_path):
    stage = tmp_path / "t2v"
    launch = Launch(t2v_command(stage, demo_data, 500, 29645), tmp_path / "run.log")
    try:
        launch.wait_for(lambda: 1 in logged_losses(stage))
        workers = [pid for pid in launch.pids() if pid != launch.proc.pid]
        assert len(workers) >= 2, workers
        # Meanwhile a second run aimed at the same save dir is refused (the lock), and it leaves
        # nothing behind.
        second = run(t2v_command(stage, demo_data, 4, 29646))
        assert second.returncode != 0 and "configuration error" in second.stderr, second.stderr[-3000:]
        assert "is being written by another run" in second.stderr, second.stderr[-3000:]

        launch.signal_launcher(signal.SIGKILL)
        launch.wait()
        assert launch.wait_until_gone(timeout=10) == [], "workers outlived their launcher"
    finally:
        launch.kill_everything()
    # The lock died with the run: the save dir is free at once.
    from megatron_video.training.checkpoint_files import SaveDirLock

    with SaveDirLock(stage / "checkpoints"):
        pass


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.relative_to(folder).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_a_wrong_load_dir_fails_before_training_and_touches_nothing(demo_data, tmp_path):
    stage = tmp_path / "t2v"
    first = run(t2v_command(stage, demo_data, 2, 29648))
    assert first.returncode == 0, first.stderr[-3000:]
    save_dir = stage / "checkpoints"
    before = _tree_digest(stage)
    fresh = tmp_path / "fresh"
    # Refused before any process group starts (one process, no launcher needed). The other wrong
    # paths (a file, a folder of something else, unfinished saves): tests/unit/test_checkpoint_files.py.
    cmd = t2v_command(fresh, demo_data, 4, 29649, f"training.checkpoint.load_dir={tmp_path / 'no_such_dir'}")
    result = run([sys.executable, *cmd[cmd.index("pretrain_t2v.py") :]])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "training.checkpoint.load_dir=" in result.stderr, result.stderr[-2000:]
    assert "is not a checkpoint: found nothing (the path does not exist)" in result.stderr
    assert not fresh.exists()
    # A checkpoint folder (not its save dir) is a valid load_dir: training continues from step 2.
    result = run(
        t2v_command(fresh, demo_data, 3, 29650, f"training.checkpoint.load_dir={save_dir / 'iter_0000002'}")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {save_dir / 'iter_0000002'} at step 2" in result.stdout
    assert sorted(logged_losses(fresh)) == [3]
    assert _tree_digest(stage) == before
