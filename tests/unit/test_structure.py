"""Code-structure rules: model code is math, hardware dispatch has one seam."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from megatron_video.platform.attention import AttentionBackendUnavailable, attention, resolve_backend

PACKAGE = Path(__file__).parents[2] / "megatron_video"

LAYERS = (
    ("errors", "config"),
    ("platform", "parallel"),
    ("models", "diffusion", "planning"),
    ("data",),
    ("training", "inference"),
    ("testing",),
)
"""The package's layers, bottom first: a module imports only from its own layer or below. Config
modules (`config/`, and every `config.py`: model, VAE and data sections) sit with `errors` at the
bottom whatever their folder, since they only describe and validate."""

MAX_LINES = 900


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    """Index in LAYERS of a package module. Config modules belong to the bottom layer; a package's
    `__init__` sits at the highest layer it imports from (0 when it only has a docstring), so
    importing `models.wfvae.config` is as light as its `__init__` files are."""
    parts = module.split(".")
    if MODULES[module].name == "__init__.py":
        return max((layer(m) for m in imported_modules(MODULES[module])), default=0)
    if parts[1] == "config" or parts[-1] == "config":
        return 0
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module} is in no layer; add its folder to LAYERS (and docs/ARCHITECTURE.md)")


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Package modules a file imports, at any depth (function bodies, TYPE_CHECKING blocks and all).

    `import a.b.c` and `from a.b import c` also run the `__init__` of every package on the way, so
    those count as imported too.
    """
    tree = ast.parse(source if source is not None else path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets |= {f"{module}.{a.name}" for a in node.names}
    own_packages = {package.rsplit(".", n)[0] for n in range(package.count(".") + 1)}
    found = set()
    for target in targets:
        if not target.startswith("megatron_video"):
            continue
        parts = target.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[:n])
            if name in MODULES and (n == len(parts) or name not in own_packages):
                found.add(name)
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    return {name: imported_modules(path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules, first repeated last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a higher layer, and of training/ from outside it."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer(target) > layer(module):
                bad.append(f"{module} -> {target}")
            elif target.startswith("megatron_video.training") and not module.startswith(
                "megatron_video.training"
            ):
                bad.append(f"{module} -> {target} (only training/ imports training/)")
    return bad


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downward():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order (docs/ARCHITECTURE.md):\n" + "\n".join(bad)


def test_structure_checks_catch_a_cycle_and_an_upward_import():
    graph = import_graph()
    graph["megatron_video.data.frames"] = graph["megatron_video.data.frames"] | {
        "megatron_video.data.dataset"
    }
    assert find_cycle(graph) is not None
    lazy = "def f():\n    from megatron_video.training.loop import Trainer\n"
    graph["megatron_video.models.suv.config"] = imported_modules(
        MODULES["megatron_video.models.suv.config"], lazy
    )
    assert "megatron_video.models.suv.config -> megatron_video.training.loop" in upward_imports(graph)


def test_files_stay_readable():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"


def test_parallel_state_is_read_only_in_parallel():
    readers = [
        name
        for name, path in MODULES.items()
        if not name.startswith(("megatron_video.parallel", "megatron_video.testing"))
        and any(
            n.startswith("megatron.core") and n.endswith(("parallel_state", "mpu")) for n in _imports(path)
        )
    ]
    assert not readers, f"read Megatron's global parallel_state outside parallel/: {readers}"


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
