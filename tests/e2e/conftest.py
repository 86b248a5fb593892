"""Shared fixtures of the end-to-end tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo clips and images (tools/prepare_demo_data.py), prepared once per session; the data list file."""
    out = tmp_path_factory.mktemp("demo") / "data"
    subprocess.run(
        [sys.executable, "tools/prepare_demo_data.py", str(out)], cwd=ROOT, check=True, capture_output=True
    )
    return out / "data.txt"
