"""platform/megatron_import.py: torch.compile decorations made while megatron imports are deferred to
the first call, with the same options, and anything else reaches torch.compile unchanged."""

from __future__ import annotations

import sys

import torch

from megatron_video.platform.megatron_import import _deferred_compile, import_megatron_core


def test_decorated_functions_compile_on_first_call_only():
    calls = []

    def real(model=None, **options):
        calls.append((model, options))
        return lambda *a, **k: ("compiled", model(*a, **k))

    deferred = _deferred_compile(real)

    def double(x):
        return 2 * x

    plain = deferred(double)
    with_options = deferred(dynamic=False)(double)
    assert calls == []  # decorating builds nothing
    assert plain.__name__ == "double" and plain(3) == ("compiled", 6) and plain(4) == ("compiled", 8)
    assert calls == [(double, {})]  # compiled once, on the first call
    assert with_options(1) == ("compiled", 2) and calls[-1] == (double, {"dynamic": False})
    module = torch.nn.Linear(2, 2)
    deferred(module, mode="default")
    assert calls[-1] == (module, {"mode": "default"})  # modules go straight to torch.compile


def test_megatron_imports_with_the_real_torch_compile_restored():
    real = torch.compile
    import_megatron_core()
    assert "megatron.core" in sys.modules and torch.compile is real
    from megatron.core import jit

    assert jit.jit_fuser is not real  # megatron's fuser keeps deferring (it compiles on first call)
