"""``eaft_megatron.compat.lazy_compile``: ``torch.compile`` on a function's first call.

    python -m pytest -q tests/compat/test_lazy_compile.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from eaft_megatron.compat import lazy_compile as lc
from tests.support.launch import ROOT, subprocess_env


@pytest.fixture
def recorded(monkeypatch):
    """The real torch.compile replaced by a recorder (returns ``fn`` doubled)."""
    calls = []

    def fake_compile(model, **options):
        calls.append((model, options))
        if isinstance(model, torch.nn.Module):
            return model
        return lambda *a, **k: 2 * model(*a, **k)

    monkeypatch.setattr(lc, "_REAL", fake_compile)
    return calls


def test_compiles_on_the_first_call_only_with_the_same_options(recorded):
    def f(x, *, y=1):
        return x + y

    lazy = lc.lazy_compile(f, mode="max-autotune", dynamic=False)
    assert recorded == []  # nothing compiled at decoration
    assert lazy(1, y=2) == 6 and lazy(2) == 6
    assert recorded == [(f, {"mode": "max-autotune", "dynamic": False})]
    assert lazy.__wrapped__ is f and lazy.__name__ == "f"
    # what torch.compile's wrapper carries: TorchDynamo inlines / unwraps to the original
    assert lazy._torchdynamo_orig_callable is f and lazy._torchdynamo_inline is f
    assert lazy._torchdynamo_wrapper_id == id(lazy)

    @lc.lazy_compile(fullgraph=True)  # the decorator-factory form
    def g(x):
        return x

    assert recorded[1:] == [] and g(3) == 6 and recorded[1] == (g.__wrapped__, {"fullgraph": True})


def test_modules_and_methods(recorded):
    module = torch.nn.Linear(2, 2)
    assert lc.lazy_compile(module) is module and recorded == [(module, {})]  # at once

    class A:
        @lc.lazy_compile
        def m(self, x):
            return x + 1

    assert A().m(1) == 4 and recorded[1][0] is A.m.__wrapped__


def test_install_and_restore():
    real = torch.compile
    try:
        lc.defer_torch_compile()
        lc.defer_torch_compile()  # idempotent
        assert torch.compile is lc.lazy_compile and lc._REAL is real
    finally:
        lc.restore()
    assert torch.compile is real and lc._REAL is None
    lc.restore()
    assert torch.compile is real


def test_real_compile_results_and_inlining_in_an_outer_compiled_region():
    torch._dynamo.reset()

    def inner(x):
        return torch.sin(x) * 2

    lazy_inner = lc.lazy_compile(inner, backend="eager")

    def outer(x):
        return lazy_inner(x) + 1

    x = torch.randn(5)
    assert torch.equal(lazy_inner(x), inner(x))
    # fullgraph: TorchDynamo inlines the original function (no graph break in the wrapper)
    compiled = torch.compile(outer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), inner(x) + 1)


def test_megatron_imported_after_the_deferral_compiles_nothing():
    """One child: megatron-core and -training imported after ``defer_torch_compile`` import no
    inductor; its jit helpers are lazy, compile_helpers' eager unwrapping still finds the
    original function."""
    script = textwrap.dedent("""
        import sys
        from eaft_megatron.compat.lazy_compile import defer_torch_compile, lazy_compile
        defer_torch_compile()
        import megatron.core, megatron.training
        from megatron.core import jit
        from megatron.core.fusions import fused_bias_swiglu
        from megatron.core.ssm.gated_delta_net import common
        from eaft_megatron.compat import deltanet
        assert "torch._inductor.compile_fx" not in sys.modules
        assert jit.jit_fuser is lazy_compile
        assert fused_bias_swiglu.swiglu._eaft_lazy_compile
        method = common._GDNBase._apply_gated_norm
        assert deltanet.eager(method).__closure__[0].cell_contents is method.__wrapped__
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_cpu_layer_runs_deferred_functions_uncompiled(recorded):
    """Under the CPU layer a deferred function that has not compiled yet runs as plain Python
    (no inductor, no C++ toolchain); once the layer is uninstalled it compiles on its next call,
    and a function compiled before keeps its compiled version."""
    from eaft_megatron.compat.cpu import cpu_compat, cpu_compat_installed

    if cpu_compat_installed():
        pytest.skip("the CPU layer is installed for this whole process")

    def f(x):
        return x + 1

    def g(x):
        return x + 10

    lazy_f, lazy_g = lc.lazy_compile(f), lc.lazy_compile(g)
    assert lazy_g(1) == 22  # compiled before the layer: the recorder's doubling
    with cpu_compat() as installed:
        assert installed and lc.EAGER
        assert lazy_f(1) == 2 and lazy_f(2) == 3 and lazy_g(1) == 22
        assert [m for m, _ in recorded] == [g]  # f never went to torch.compile
    assert not lc.EAGER
    assert lazy_f(1) == 4 and [m for m, _ in recorded] == [g, f]
