"""Quiet console output: known third-party notices are filtered, everything else still prints.

`KNOWN_NOTICES` lists, message pattern by message pattern, the warnings of the libraries this stack
uses that say nothing actionable about a run here (megatron-core's fall-backs when Transformer
Engine / Apex are not installed, torch deprecations inside megatron-core's own calls, ...); each was
printed by every rank of every launch. Transformers' weight-loading progress bars are turned off the
same way. `install_output_filters()` installs one `warnings` filter
per pattern (so a warning that matches none still prints, once per place, as Python's default
filter shows it) and is idempotent; the entry scripts call it before importing megatron.
"""

from __future__ import annotations

import os
import re
import warnings

KNOWN_NOTICES: tuple[tuple[str, type[Warning], str, str], ...] = (
    (
        r"Transformer Engine and Apex are not installed\. Falling back to",
        UserWarning,
        "",
        "megatron-core at import, four times per process: its local fused-kernel fall-backs (optimizer, "
        "grad clipping, FSDP mixed precision) are what this stack runs without TE / Apex",
    ),
    (
        r"full scope is deprecated\. Use empty cuda_graph_scope",
        UserWarning,
        "",
        "megatron-core's TransformerConfig about its own default cuda_graph_scope (CUDA graphs are not used)",
    ),
    (
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        FutureWarning,
        "",
        "torch, raised inside megatron-core's all-gathers and reduce-scatters (sequence parallel, distributed optimizer)",
    ),
    (
        r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
        UserWarning,
        r"megatron\.core\.optimizer\.optimizer$",
        "torch, on the first zero_grad of megatron-core's distributed optimizer with fp32 parameters: its "
        "fp32 shards are views of the parameters, and it resets their (never populated) .grad",
    ),
)
"""(message regex matched at the start of the warning text, category, module regex the warning must
be raised from ("" for any), where it comes from and why it is noise here), as captured from the
demo's console."""

CPU_ONLY_NOTICES: tuple[tuple[str, type[Warning], str, str], ...] = (
    (
        r"When using async grad allreduce it is recommended to set the environment variable "
        r"CUDA_DEVICE_MAX_CONNECTIONS",
        UserWarning,
        "",
        "megatron-core's tensor-parallel linears: a CUDA stream setting, meaningless without CUDA",
    ),
)
"""Notices filtered only in processes without CUDA (on a GPU they are advice worth reading)."""

_installed = False


def install_output_filters() -> None:
    """Ignore the `KNOWN_NOTICES` in this process (once; later calls do nothing). Any other warning
    keeps Python's default handling."""
    global _installed
    if _installed:
        return
    import torch

    notices = KNOWN_NOTICES + (() if torch.cuda.is_available() else CPU_ONLY_NOTICES)
    for pattern, category, module, _ in notices:
        warnings.filterwarnings("ignore", message=pattern, category=category, module=module)
    # transformers' "Loading weights" bar of every text-encoder load, on every rank (an explicit
    # HF_HUB_DISABLE_PROGRESS_BARS=0 keeps it, and download bars with it).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _installed = True


def is_known_notice(message: str, category: type[Warning] = UserWarning, module: str = "") -> bool:
    """Whether a warning's text, category and raising module match an entry of `KNOWN_NOTICES`."""
    return any(
        issubclass(category, cat) and re.match(pattern, message) and re.match(where, module)
        for pattern, cat, where, _ in KNOWN_NOTICES
    )
