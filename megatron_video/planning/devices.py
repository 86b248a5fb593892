"""Accelerators the planner knows: dense bf16 peak, achieved matmul rate, memory, links.

Peaks are the vendors' dense bf16 figures (no sparsity). `matmul_efficiency` is the fraction of
the peak large bf16 GEMMs reach in practice and `attention_efficiency` that of a fused attention
kernel forward + backward; both are starting points that `benchmarks/gpu_check.sh` measures on a
real card (override them with `tools/plan.py --matmul-tflops / --attention-tflops`). Link figures
are per device and per direction, in GB/s: `intra_node_gbps` over NVLink / HCCS inside a node of
`devices_per_node`, `inter_node_gbps` over the network (InfiniBand / RoCE).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """One accelerator type as the planner sees it."""

    name: str
    peak_tflops: float
    """Dense bf16 peak, TFLOP/s."""
    memory_gb: float
    """Device memory, GB (1e9 bytes)."""
    intra_node_gbps: float
    """Per-device bandwidth to peers in the node, GB/s per direction."""
    inter_node_gbps: float
    """Per-device network bandwidth to other nodes, GB/s per direction."""
    devices_per_node: int = 8
    matmul_efficiency: float = 0.7
    """Achieved fraction of `peak_tflops` on large bf16 matmuls."""
    attention_efficiency: float = 0.5
    """Achieved fraction of `peak_tflops` in fused attention, forward and backward."""
    reserved_gb: float = 1.5
    """Memory the allocator cannot hand to tensors: runtime context, communicator buffers, workspaces."""

    @property
    def matmul_tflops(self) -> float:
        """Achieved dense bf16 matmul rate, TFLOP/s."""
        return self.peak_tflops * self.matmul_efficiency

    @property
    def attention_tflops(self) -> float:
        """Achieved fused-attention rate, TFLOP/s."""
        return self.peak_tflops * self.attention_efficiency


DEVICES: dict[str, Device] = {
    "h100": Device(
        "NVIDIA H100 SXM 80GB", 989.0, 80.0, 450.0, 50.0, matmul_efficiency=0.75, attention_efficiency=0.55
    ),
    "h200": Device(
        "NVIDIA H200 141GB", 989.0, 141.0, 450.0, 50.0, matmul_efficiency=0.75, attention_efficiency=0.55
    ),
    "a100": Device(
        "NVIDIA A100 80GB", 312.0, 80.0, 300.0, 25.0, matmul_efficiency=0.8, attention_efficiency=0.6
    ),
    "b200": Device(
        "NVIDIA B200 180GB", 2250.0, 180.0, 900.0, 50.0, matmul_efficiency=0.7, attention_efficiency=0.5
    ),
    "910b": Device(
        "Ascend 910B 64GB", 354.0, 64.0, 196.0, 25.0, matmul_efficiency=0.7, attention_efficiency=0.45
    ),
}
"""Known devices by short name (`tools/plan.py --device`)."""

_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    ("h200", "h200"),
    ("h100", "h100"),
    ("h800", "h100"),
    ("gh200", "h100"),
    ("a100", "a100"),
    ("a800", "a100"),
    ("b200", "b200"),
    ("910b", "910b"),
    ("ascend910b", "910b"),
)
"""Substrings of a torch device name (lower case, spaces removed) -> a `DEVICES` key; the first match wins."""


def device_from_name(torch_name: str) -> Device | None:
    """The table entry for a device name as torch reports it ("NVIDIA H100 80GB HBM3", "Ascend910B2"),
    or None when the card is not in the table."""
    key = torch_name.lower().replace(" ", "").replace("-", "")
    for pattern, short in _NAME_PATTERNS:
        if pattern in key:
            return DEVICES[short]
    return None


def get_device(
    short: str,
    memory_gb: float | None = None,
    peak_tflops: float | None = None,
    matmul_tflops: float | None = None,
    attention_tflops: float | None = None,
    intra_node_gbps: float | None = None,
    inter_node_gbps: float | None = None,
    devices_per_node: int | None = None,
) -> Device:
    """A `DEVICES` entry (or `custom`, which needs memory_gb and peak_tflops) with the given fields replaced."""
    if short == "custom":
        if memory_gb is None or peak_tflops is None:
            raise ValueError("--device custom needs --memory-gb and --peak-tflops")
        base = Device("custom", peak_tflops, memory_gb, 100.0, 25.0)
    elif short in DEVICES:
        base = DEVICES[short]
    else:
        raise ValueError(f"unknown device '{short}'; choose one of {sorted(DEVICES) + ['custom']}")
    changes: dict = {}
    if memory_gb is not None:
        changes["memory_gb"] = memory_gb
    if peak_tflops is not None:
        changes["peak_tflops"] = peak_tflops
    peak = changes.get("peak_tflops", base.peak_tflops)
    if matmul_tflops is not None:
        changes["matmul_efficiency"] = matmul_tflops / peak
    if attention_tflops is not None:
        changes["attention_efficiency"] = attention_tflops / peak
    for name, value in (
        ("intra_node_gbps", intra_node_gbps),
        ("inter_node_gbps", inter_node_gbps),
        ("devices_per_node", devices_per_node),
    ):
        if value is not None:
            changes[name] = value
    return dataclasses.replace(base, **changes)
