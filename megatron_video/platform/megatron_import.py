"""Import megatron-core without building torch.compile wrappers for its fusions at import time.

`megatron.core.jit` sets `jit_fuser = torch.compile`, and a score of fused bias / activation
functions are decorated with it while `megatron.core` imports. Each decoration makes torch build
an inductor configuration, which imports `torch._dynamo` and `torch._inductor`: about 3 s of every
process start on CPU (5.0 s -> 2.2 s for `import megatron.core`), paid by every rank of every
launch whether or not a fused function ever runs (our models call none of them).

`import_megatron_core()` imports megatron-core with `torch.compile` replaced, for the length of
that import only, by a deferring decorator: a function decorated then is compiled by the real
`torch.compile`, with the same options, on its first call, exactly as it would have been. Any
other use of `torch.compile` (a module) goes straight to torch. `megatron.core.jit.jit_fuser` keeps the
deferring decorator, so fused functions of megatron modules imported later also compile on first
call. Entry scripts and test workers call it before anything imports megatron.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _deferred_compile(real: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for `torch.compile` whose function decorations compile on first call."""

    def deferred(model: Any = None, **options: Any) -> Any:
        if model is None:  # @torch.compile(**options)
            return lambda fn: deferred(fn, **options)
        if isinstance(model, torch.nn.Module) or not callable(model):
            return real(model, **options)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)

        return first_call_compiles

    return deferred


@contextlib.contextmanager
def _torch_compile_deferred() -> Iterator[None]:
    real = torch.compile
    torch.compile = _deferred_compile(real)
    try:
        yield
    finally:
        torch.compile = real


def import_megatron_core() -> None:
    """Import `megatron.core` (once per process; a no-op when it is already imported)."""
    if "megatron.core" in sys.modules:
        return
    with _torch_compile_deferred():
        import megatron.core  # noqa: F401
