"""Process-wide state under threads: the path override, the Triton interpreter, the warnings.

Each test here failed before its fix: use_path was one process-wide variable (two interleaved
blocks left it set for good; a backward after the block forgot the forward's request), the
interpreter crashed when two threads launched at once, and warn_once kept one key per shape.
"""
import threading
import warnings
from collections import OrderedDict

import pytest
import torch

import fused_rnn
from conftest import kernel_device, requires_kernels
from fused_rnn import _backend, _paths


def _in_threads(*fns, timeout=600):
    """Run each fn in its own thread; re-raise the first error; fail on a hang."""
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # handed to the main thread below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def test_use_path_interleaved_blocks_restore_exactly(monkeypatch):
    monkeypatch.delenv(_paths.ENV_VAR, raising=False)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with fused_rnn.use_path("step"):
            a_in.set()
            b_in.wait(30)
            seen["a"] = _paths.requested()
        a_out.set()

    def b():
        a_in.wait(30)
        seen["b_outside"] = _paths.requested()
        with fused_rnn.use_path("adaptive"):
            b_in.set()
            a_out.wait(30)  # a leaves its block while b is still inside its own
            seen["b"] = _paths.requested()

    _in_threads(a, b)
    assert seen == {"a": "step", "b_outside": "auto", "b": "adaptive"}
    assert _paths.requested() == "auto"  # nothing left set


def test_use_path_nested_restores():
    with fused_rnn.use_path("step"):
        with fused_rnn.use_path("graph"):
            assert _paths.requested() == "graph"
        assert _paths.requested() == "step"
    assert _paths._override.get() is None


@requires_kernels
def test_backward_keeps_the_forwards_path_request(monkeypatch):
    """The forward's use_path request reaches its backward, run after the block on another
    thread (as the autograd engine runs a CUDA backward)."""
    monkeypatch.delenv(_paths.ENV_VAR, raising=False)
    seen = []
    resolve = _paths.resolve
    monkeypatch.setattr(_paths, "resolve", lambda op, path, *a: seen.append((op, _paths.requested(path)))
                        or resolve(op, path, *a))
    dev = kernel_device()
    lstm = fused_rnn.LSTM(3, 5, backend="triton").to(dev)
    rnn = fused_rnn.RNN(3, 5, backend="triton").to(dev)
    x = torch.randn(4, 2, 3, device=dev)
    with fused_rnn.use_path("adaptive"):  # on CPU tensors adaptive runs the step kernels
        loss = lstm(x)[0].sum() + rnn(x)[0].sum()
    _in_threads(loss.backward)
    assert sorted(seen) == [("lstm_bwd", "adaptive"), ("lstm_fwd", "adaptive"),
                            ("rnn_bwd", "adaptive"), ("rnn_fwd", "adaptive")]


@requires_kernels
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_triton_backend_from_two_threads(cell):
    """Two threads training triton-backend layers at once give each its single-thread result
    (the interpreter is serialised; CUDA launches need nothing)."""
    dev = kernel_device()
    make = (lambda: fused_rnn.LSTM(4, 6, backend="triton")) if cell == "lstm" else \
        (lambda: fused_rnn.RNN(4, 6, backend="triton"))
    torch.manual_seed(0)
    models = [make().double().to(dev) for _ in range(2)]
    xs = [torch.randn(5, 3, 4, dtype=torch.float64, device=dev) for _ in range(2)]

    def run(m, x):
        m.zero_grad()
        out = m(x)[0]
        out.pow(2).sum().backward()
        return out.detach().clone(), [p.grad.clone() for p in m.parameters()]

    expected = [run(m, x) for m, x in zip(models, xs)]
    got = [None, None]

    def worker(i):
        def fn():
            for _ in range(3):
                got[i] = run(models[i], xs[i])
        return fn

    _in_threads(worker(0), worker(1))
    for (o, g), (eo, eg) in zip(got, expected):
        assert torch.equal(o, eo)
        assert all(torch.equal(a, b) for a, b in zip(g, eg))


def test_warn_once_per_cause_not_per_shape(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for B in range(1, 6):
            _backend.warn_once(f"lstm:an empty problem (T=0, B={B}, H=5)", f"empty {B}")
        _backend.warn_once("lstm:mixed dtypes", "mixed")
    assert [str(w.message) for w in caught] == ["empty 1", "mixed"]
    assert len(_backend._warned) == 2


def test_warn_once_registry_is_bounded(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(_backend.WARN_KEYS_MAX + 50):
            _backend.warn_once("cause " + "x" * (i % 7) + chr(65 + i % 26) + chr(65 + i // 26), "m")
    assert len(_backend._warned) == _backend.WARN_KEYS_MAX


def test_warnings_unsuppressed_sets_the_record_aside(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _backend.warn_once("a", "first")
        with _backend.warnings_unsuppressed():
            _backend.warn_once("a", "again")
        _backend.warn_once("a", "not again")
    assert [str(w.message) for w in caught] == ["first", "again"]
