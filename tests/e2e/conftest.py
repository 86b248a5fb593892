"""Shared fixtures and process helpers of the end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
RUN_MARKER = "MEGATRON_VIDEO_TEST_RUN"
"""Environment variable carrying a run's id: every process of that run (torchrun, its workers, their
helper processes) inherits it, which is how a test finds them all."""


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo clips and images (tools/prepare_demo_data.py), prepared once per session; the data list file."""
    out = tmp_path_factory.mktemp("demo") / "data"
    subprocess.run(
        [sys.executable, "tools/prepare_demo_data.py", str(out)], cwd=ROOT, check=True, capture_output=True
    )
    return out / "data.txt"


STEPS = 6
"""Steps of the resume tests' runs (checkpoints at 2, 4, 6)."""


@pytest.fixture(scope="session")
def reference_losses(demo_data, tmp_path_factory):
    """Per-step losses of an uninterrupted 6-step run (compared bitwise by the resume tests)."""
    stage = tmp_path_factory.mktemp("reference") / "full"
    full = run(t2v_command(stage, demo_data, STEPS, 29611))
    assert full.returncode == 0, full.stderr[-3000:]
    losses = logged_losses(stage)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def assert_resumes_exactly(stage, demo_data, reference: dict, port: int) -> None:
    """Run the same command again: it resumes and every step's loss equals the reference bitwise."""
    resumed = run(t2v_command(stage, demo_data, STEPS, port))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    after = logged_losses(stage)
    for step in range(1, STEPS + 1):
        assert after[step] == reference[step], (step, after[step], reference[step])  # bitwise on CPU
    assert (stage / "final_ema.safetensors").is_file() and (stage / "loss_curve.png").is_file()


def t2v_command(stage_dir: Path, data_list: Path, steps: int, port: int, *extra: str) -> list[str]:
    """torchrun (2 processes) of pretrain_t2v.py on the tiny T2V stage (TP=2 + SP), saving every 2 steps."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "pretrain_t2v.py", "examples/tiny/t2v.yaml",
        "vae.checkpoint=null", f"data.data_list={data_list}", f"training.steps={steps}",
        "training.checkpoint.save_interval=2", "training.optimizer.warmup_steps=1", *extra,
        "--stage-dir", str(stage_dir),
    ]  # fmt: skip


def logged_losses(stage_dir: Path) -> dict[int, float]:
    """Last logged loss per step (a resumed run re-logs the steps after its checkpoint)."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m["loss"]
    return out


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run to completion from the repository root (one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


class Launch:
    """A background run whose every process carries a unique RUN_MARKER."""

    def __init__(self, cmd: list[str], log: Path):
        self.marker = uuid.uuid4().hex
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", RUN_MARKER: self.marker}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
            )

    def pids(self) -> list[int]:
        """Every live process of the run (torchrun, workers, helpers), found by the marker."""
        needle = f"{RUN_MARKER}={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in environ.split(b"\0") and state != "Z":
                found.append(int(entry.name))
        return found

    def wait_for(self, condition, timeout: float = 400) -> None:
        """Poll `condition()` until true; fail when the run ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (rc {self.proc.returncode}) first:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def signal_launcher(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def signal_all(self, sig: int) -> None:
        """Send `sig` to every process of the run at once (what Slurm does on pre-emption)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def wait_until_gone(self, timeout: float = 20) -> list[int]:
        """Wait until no process of the run is left; return the survivors if some outlive `timeout`."""
        deadline = time.monotonic() + timeout
        while (alive := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return alive

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_everything(self) -> None:
        """SIGKILL every process of the run (clean-up)."""
        self.signal_all(signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
