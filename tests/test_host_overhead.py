"""The step loops' bound launch (kernels._common.StepLauncher) and bench/host_overhead.py, on the
CPU: Triton's dispatch runs for real up to the launcher, which a recorder replaces. Checked: each
step launched once, in order; the direct launch passes the launcher what Triton's dispatch passes
it; where the dispatch is kept (switched off, a launch hook, a replaced JITFunction.run, t
specialised, a grid function, the interpreter). No timing is asserted."""
import importlib.util
import os

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

from conftest import INTERPRET
from fused_rnn.kernels import _common, config
from fused_rnn.kernels._common import StepLauncher, given

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
compiled_only = pytest.mark.skipif(INTERPRET, reason="Triton's compiled dispatch (TRITON_INTERPRET=1: interpreted)")


def _module():
    spec = importlib.util.spec_from_file_location("host_overhead", os.path.join(REPO, "bench", "host_overhead.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ho = _module()


@triton.heuristics(given(HAS_Y="y_ptr"))
@triton.jit(do_not_specialize=["t"])
def _step_kernel(x_ptr, y_ptr, t, n, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n)
    if HAS_Y:
        v += tl.load(y_ptr + offs, mask=offs < n)
    tl.store(x_ptr + offs, v + t, mask=offs < n)


@triton.jit
def _t_specialised(x_ptr, t, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), t)


@triton.jit(do_not_specialize=["t"])
def _with_default(x_ptr, t, n=4, BLOCK: tl.constexpr = 8):
    tl.store(x_ptr + tl.arange(0, BLOCK), t, mask=tl.arange(0, BLOCK) < n)


def _check_same_launch(first, later, t_at):
    """A direct launch (later) against Triton's (first) of the same loop: the same grid, stream,
    function, metadata and arguments (the same objects), t apart; no launch metadata or hooks
    (None: the launcher calls none, as with Triton's empty hook chains)."""
    assert first[0] == later[0]
    a, b = first[1], later[1]
    assert a[:6] == b[:6] and len(a) == len(b)
    assert a[7] is knobs.runtime.launch_enter_hook and b[6:9] == (None, None, None)
    for i, (x, y) in enumerate(zip(a[9:], b[9:])):
        if 9 + i != t_at:
            assert x is y or (type(x) is type(y) and x == y), f"argument {i}: {x!r} vs {y!r}"


@compiled_only
@pytest.mark.parametrize("cell,H", [("lstm", 16), ("rnn", 16), ("gru", 16), ("lnlstm", 16), ("lnlstm", 256)],
                         ids=["lstm", "rnn", "gru", "lnlstm-fused", "lnlstm-unfused"])
def test_each_step_launched_once_in_order(cell, H):
    mod = {"rnn": ho.rnn, "gru": ho.gru}.get(cell, ho.lstm)
    fwd_name, bwd_name = (f"{mod.__name__.rpartition('.')[2]}_{d}_kernel" for d in ("fwd", "bwd"))
    T = 3
    with ho.recording() as log:
        fwd, bwd, _ = ho.problem(cell, H, T)
        for run, name, ts in ((fwd, fwd_name, [0, 1, 2]), (bwd, bwd_name, [2, 1, 0])):
            log.clear()
            _common.LAUNCH_PATHS.clear()
            run()
            assert ho.steps_of(log) == [(name, t) for t in ts]
            assert _common.LAUNCH_PATHS == {name: "direct"}
            t_at = 9 + ho._jit(getattr(mod, name)).arg_names.index("t")
            _check_same_launch(log[0], log[1], t_at)
            _check_same_launch(log[0], log[2], t_at)


@compiled_only
def test_heuristics_flags_and_arguments_as_triton_binds_them():
    x, y = torch.empty(8), torch.empty(8)
    at = 9 + ho._jit(_step_kernel).arg_names.index("t")
    for y_arg in (y, None):
        with ho.recording([_step_kernel]) as log:
            step = StepLauncher(_step_kernel, (2,), x, y_arg, 0, 8, BLOCK=8, num_warps=1)
            for t in range(4):
                step(t)
        assert step.how == "direct"
        assert ho.steps_of(log, [_step_kernel]) == [("_step_kernel", t) for t in range(4)]
        assert log[1][1][9:] == (x, y_arg, 1, 8, y_arg is not None, 8)  # HAS_Y from the heuristic
        _check_same_launch(log[0], log[3], at)


def _how(kernel, grid, *args, **meta):
    with ho.recording([kernel]) as log:
        step = StepLauncher(kernel, grid, *args, **meta)
        for t in range(3):
            step(t)
    assert ho.steps_of(log, [kernel]) == [(ho._jit(kernel).__name__, t) for t in range(3)]
    assert all(a[7] is knobs.runtime.launch_enter_hook for _, a in log[1:]) == (step.how != "direct")
    return step.how


@compiled_only
def test_dispatch_kept_where_the_direct_launch_would_differ(monkeypatch):
    x = torch.empty(8)
    ok = lambda: _how(_step_kernel, (1,), x, None, 0, 8, BLOCK=8)  # noqa: E731
    assert ok() == "direct"
    with config.using(direct_launch=False):
        assert ok() == "standard: options().direct_launch is off"
    assert _how(_t_specialised, (1,), x, 0, BLOCK=8) == "standard: t is specialised"
    assert _how(_step_kernel, lambda meta: (1,), x, None, 0, 8, BLOCK=8) == "standard: a grid function"
    assert _how(_with_default, (1,), x, 0) == "standard: an argument left to its default"

    seen = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    try:
        assert ok() == "standard: a launch hook is set"
    finally:
        knobs.runtime.launch_enter_hook.remove(seen.append)
    assert ok() == "direct"

    orig = JITFunction.run

    def recorder_run(self, *args, **kwargs):  # as bench/precompile.py's launch record
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", recorder_run)
    assert ok() == "standard: JITFunction.run is not the one the direct launch mirrors"


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's launch: TRITON_INTERPRET=1")
def test_interpreter_keeps_the_dispatch():
    from fused_rnn.kernels import rnn

    _common.LAUNCH_PATHS.clear()
    x, h0, w_ih, w_hh = torch.randn(2, 2, 3), torch.randn(2, 4), torch.randn(4, 3), torch.randn(4, 4)
    rnn.rnn_fwd(x, h0, w_ih, w_hh)
    assert _common.LAUNCH_PATHS == {"rnn_fwd_kernel": "standard: no compiled kernel (the interpreter)"}


@compiled_only
def test_benchmark_runs(capsys):
    assert ho.main(["--steps", "17", "--repeat", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("machine:") and len(out) == 5 + 2 * len(ho.CELLS)
    assert all(line.endswith("  direct") for line in out[4:-1]) and out[-1].startswith("target:")
