"""Code-structure rules: model code is math, hardware dispatch has one seam."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from megatron_video.platform.attention import AttentionBackendUnavailable, attention, resolve_backend

PACKAGE = Path(__file__).parents[2] / "megatron_video"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").rglob("*.py")), ids=lambda p: p.name)
def test_models_read_no_global_state(path):
    text = path.read_text()
    forbidden = [
        n for n in _imports(path) if "parallel_state" in n or n.startswith("megatron_video.training")
    ]
    assert not forbidden, f"{path} imports {forbidden}"
    assert "get_args(" not in text and "parallel_state." not in text


def test_no_bare_except_or_hardware_probe_imports():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler):
                assert node.type is not None, f"bare except in {path}:{node.lineno}"


def test_attention_backends_fail_clearly_on_cpu():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(AttentionBackendUnavailable, match="CUDA devices only"):
        attention(q, q, q, None, 0.25, backend="flash")
    with pytest.raises(AttentionBackendUnavailable, match="Ascend devices only"):
        resolve_backend("npu", "cpu")
    with pytest.raises(AttentionBackendUnavailable, match="unknown attention backend"):
        resolve_backend("xformers", "cpu")
    assert resolve_backend("auto", "cpu") == "sdpa"


def test_sdpa_mask_excludes_keys():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 16) for _ in range(3))
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    out = attention(q, k, v, keep, 0.25)
    ref = ((q @ k.transpose(-1, -2)) * 0.25).masked_fill(~keep[:, None, None], float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, ref)
