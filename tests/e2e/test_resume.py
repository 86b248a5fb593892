"""A training run killed with SIGKILL and resumed continues the exact loss sequence.

Real demo data, MiniLM, the tiny VAE (random weights: the VAE is not what is tested), TP=2 + SP
on 2 processes through torchrun and pretrain_t2v.py, checkpoints every 2 steps.
"""

from __future__ import annotations

import signal

import pytest

from tests.e2e.conftest import STEPS, Launch, assert_resumes_exactly, logged_losses, t2v_command

pytestmark = pytest.mark.e2e


def test_sigkill_of_every_process_and_resume_continue_the_same_losses(demo_data, tmp_path, reference_losses):
    stage = tmp_path / "killed"
    launch = Launch(t2v_command(stage, demo_data, STEPS, 29612), tmp_path / "killed.log")
    try:
        # Step 5 logged means the checkpoint after step 4 is complete (save follows the log line).
        launch.wait_for(lambda: 5 in logged_losses(stage))
        launch.signal_all(signal.SIGKILL)  # torchrun, both workers and their helper processes
        launch.wait()
        assert launch.wait_until_gone() == []
    finally:
        launch.kill_everything()
    assert (stage / "checkpoints" / "latest").read_text().strip() in ("4", "6")
    assert_resumes_exactly(stage, demo_data, reference_losses, 29613)
