"""The graph path (fused_rnn._paths.graphed): the step launchers captured once per shape in a
torch.cuda.CUDAGraph and replayed. The real graphs need CUDA (those tests compare with the eager
step path); the cache logic around them (keys, copy in, replay, clone out, the bound, a refused
capture) also runs on the CPU with the CUDA calls faked.

(On CPU tensors the graph path falls back to the step kernels with a warning: that test lives in
tests/test_persistent_plan.py with the rest of the path choice.)
"""
from collections import OrderedDict

import pytest
import torch

from conftest import HAS_CUDA, INTERPRET, rel_err, requires_cuda
from fused_rnn import _backend, _paths
from fused_rnn.lstm import LSTMFunction
from fused_rnn.kernels import config
from fused_rnn.rnn import RNNFunction

DEV = torch.device("cuda")
BF16, F32 = torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    monkeypatch.delenv(_paths.ENV_VAR, raising=False)
    if HAS_CUDA:
        _paths.clear_graphs()
    with config.using(poison=HAS_CUDA):
        yield
    if HAS_CUDA:
        _paths.clear_graphs()


# ------------------------------------------------ the cache logic on the CPU, CUDA calls faked
class _FakeGraph:
    """Replays like a CUDA graph: recomputes into the very output tensors of the capture."""

    def __init__(self, fn, static_in, static_out):
        self.fn, self.static_in, self.static_out, self.replays = fn, static_in, static_out, 0

    def replay(self):
        self.replays += 1
        _copy_into(self.static_out, self.fn(*self.static_in))


def _copy_into(out, new):
    """Outputs as launchers return them: tensors, None, or tuples of them."""
    if isinstance(out, torch.Tensor):
        out.copy_(new)
    elif out is not None:
        assert len(out) == len(new)
        for o, n in zip(out, new):
            _copy_into(o, n)


class _FakeCuda:
    class Event:
        def record(self, stream):
            pass

        def synchronize(self):
            pass

    class _Stream:
        def wait_event(self, event):
            pass

    @staticmethod
    def current_stream(device=None):
        return _FakeCuda._Stream()

    @staticmethod
    def device(dev):
        import contextlib

        return contextlib.nullcontext()


@pytest.fixture
def fake_cuda(monkeypatch):
    captured = []

    def capture(fn, static_in):
        out = fn(*static_in)
        captured.append(_FakeGraph(fn, static_in, out))
        return captured[-1], out

    monkeypatch.setattr(_paths, "_capture", capture)
    monkeypatch.setattr(_paths, "_warm_up", lambda fn, static_in: None)
    for name in ("Event", "current_stream", "device"):
        monkeypatch.setattr(torch.cuda, name, getattr(_FakeCuda, name))
    monkeypatch.setattr(_paths, "_graphs", type(_paths._graphs)())
    return captured


def _toy(x, pair, scale_t):
    """A launcher stand-in: tensors, None and a tuple in; a tuple of fresh tensors out."""
    a, b = pair
    y = x * 2 + a.sum()
    if b is not None:
        y = y + b
    return y * scale_t, (x + 1).sum(0)


def test_graph_cache_logic_cpu(fake_cuda, monkeypatch):
    """Copy in, replay, clone out: fresh inputs of a cached shape give fresh results (nothing
    stale, nothing aliased); None-ness and shapes key the cache; the cache is bounded."""
    g = torch.Generator().manual_seed(0)

    def args(n, with_b=True, seed_shift=0.0):
        x = torch.randn(n, 3, generator=g) + seed_shift
        return (x, (torch.randn(2, generator=g), torch.randn(3, generator=g) if with_b else None),
                torch.randn(1, generator=g))

    first = args(4)
    out1 = _paths.graphed("toy", _toy, first, ("k",))
    for a, b in zip(out1, _toy(*first)):
        assert torch.equal(a, b)
    for _ in range(3):  # same key: one capture, replays with the new inputs
        new = args(4, seed_shift=5.0)
        out = _paths.graphed("toy", _toy, new, ("k",))
        for a, b in zip(out, _toy(*new)):
            assert torch.equal(a, b)
    assert len(fake_cuda) == 1 and fake_cuda[0].replays == 4
    for a, b in zip(out1, _toy(*first)):  # earlier results are clones, not views of the graph
        assert torch.equal(a, b)
    x_nc = torch.randn(3, 4, generator=g).t()  # non-contiguous input: copied into a static buffer
    nc = (x_nc, first[1], first[2])
    for a, b in zip(_paths.graphed("toy", _toy, nc, ("k",)), _toy(*nc)):
        assert torch.equal(a, b)
    assert len(fake_cuda) == 1
    _paths.graphed("toy", _toy, args(4, with_b=False), ("k",))  # b None: another graph
    _paths.graphed("toy", _toy, args(5), ("k",))  # another shape
    _paths.graphed("toy", _toy, args(4), ("other",))  # another static key
    assert len(fake_cuda) == 4
    monkeypatch.setattr(_paths, "GRAPH_CACHE_MAX", 2)
    _paths.graphed("toy", _toy, args(6), ("k",))
    assert len(_paths._graphs) == 2


def test_graph_capture_failure_runs_eagerly(fake_cuda, monkeypatch):
    def refuse(fn, static_in):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(_paths, "_capture", refuse)
    x = (torch.ones(2, 3), (torch.ones(2), None), torch.ones(1))
    with pytest.warns(RuntimeWarning, match="capture of toy failed"):
        out = _paths.graphed("toy", _toy, x, ())
    for a, b in zip(out, _toy(*x)):
        assert torch.equal(a, b)
    out = _paths.graphed("toy", _toy, x, ())  # remembered: no second capture, no second warning
    assert list(_paths._graphs.values()) == [None]


@pytest.mark.skipif(not INTERPRET, reason="the kernels on CPU tensors need TRITON_INTERPRET=1")
@pytest.mark.parametrize("cell", ["lstm", "lnlstm", "lstm_proj", "rnn"])
def test_graph_path_wiring_on_the_cpu(cell, fake_cuda, monkeypatch):
    """Each autograd Function on path="graph", with the CUDA calls faked and the kernels run by
    the interpreter: the ops hand their launchers and arguments to the graph cache in the right
    order, so replays with fresh inputs of one shape give the step path's results, forward and
    backward, from one capture each."""
    monkeypatch.setattr(_paths, "graph_unavailable", lambda x: (None, False))
    for seed in range(3):
        ins, extra, L, ups = _cpu_case(cell, seed)
        graphed = _cpu_run(cell, "graph", ins, extra, L, ups)
        eager = _cpu_run(cell, "step", ins, extra, L, ups)
        for i, (a, b) in enumerate(zip(graphed, eager)):
            assert torch.equal(a, b), i
    assert sorted(k[0] for k in _paths._graphs) == sorted(
        [f"{OPS[cell]}_fwd", f"{OPS[cell]}_bwd"])
    assert len(fake_cuda) == 2 and all(g.replays == 3 for g in fake_cuda)


OPS = {"lstm": "lstm", "lnlstm": "lstm", "lstm_proj": "lstm_proj", "rnn": "rnn"}


def _cpu_case(cell, seed, T=4, B=3, I=5, H=6, P=3):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.5

    Hh = P if cell == "lstm_proj" else H  # the width of h
    G = H if cell == "rnn" else 4 * H
    ins = [r(T, B, I), r(B, Hh)] + ([] if cell == "rnn" else [r(B, H)]) + [r(G, I), r(G, Hh)]
    extra = {"w_hr": r(P, H)} if cell == "lstm_proj" else {}
    if cell == "lnlstm":
        extra["ln"] = [r(G) + 1, r(G), r(H) + 1, r(H)]
    ins += [r(G), r(G)]
    L = torch.tensor([T, 1, 0][:B])
    ups = [r(T, B, Hh), r(B, Hh)] + ([] if cell == "rnn" else [r(B, H)])
    return ins, extra, L, ups


def _cpu_run(cell, path, ins, extra, L, ups):
    from fused_rnn.lstm_proj import LSTMProjFunction

    leaves = [t.detach().requires_grad_() for t in ins + list(extra.get("ln", [])) + (
        [extra["w_hr"]] if "w_hr" in extra else [])]
    if cell == "rnn":
        outs = RNNFunction.apply(*leaves, L, "tanh", False, True, path)
    elif cell == "lstm_proj":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = leaves
        outs = LSTMProjFunction.apply(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, None, None, None, None, L, config.LN_EPS,
                                      False, path)
    else:
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln = leaves
        ln = ln or [None] * 4
        outs = LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln, L, config.LN_EPS, False, True, True, path)
    loss = sum((o * u).sum() for o, u in zip(outs, ups))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


# ------------------------------------------------------------------------ CUDA: real graphs


def make(cell, T, B, I, H, dtype, lengths=None, ln=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device=DEV) * scale).to(dtype)

    G = 4 * H if cell == "lstm" else H
    k = 1.0 / H ** 0.5
    ins = [r(T, B, I), r(B, H)] + ([r(B, H)] if cell == "lstm" else []) + [r(G, I, scale=k), r(G, H, scale=k),
                                                                            r(G, scale=k), r(G, scale=k)]
    lnp = [r(G, scale=0.1) + 1, r(G, scale=0.1), r(H, scale=0.1) + 1, r(H, scale=0.1)] if ln else None
    L = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=DEV)
    ups = [r(T, B, H), r(B, H)] + ([r(B, H)] if cell == "lstm" else [])
    return ins, lnp, L, ups


def run(cell, path, ins, lnp, L, ups):
    leaves = [t.detach().requires_grad_() for t in ins]
    if cell == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = leaves
        ln = lnp if lnp is not None else [None] * 4
        outs = LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln, L, config.LN_EPS, False, True, True, path)
    else:
        outs = RNNFunction.apply(*leaves, L, "tanh", False, True, path)
    loss = sum((o * u).sum() for o, u in zip(outs, ups))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs] + list(grads)


def same(a, b, tol=1e-3):
    """Graph replay runs the very kernels of the eager step path (no atomics), so the results
    should be bitwise equal; the tolerance only leaves room for cuBLAS picking another GEMM
    algorithm under capture."""
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, i
        assert not torch.isnan(x).any(), f"[{i}] NaN (an unwritten element?)"
        assert torch.equal(x, y) or rel_err(x, y) <= tol, f"[{i}] rel err {rel_err(x, y):.2e}"


@requires_cuda
@pytest.mark.parametrize("cell,ln", [("lstm", False), ("lstm", True), ("rnn", False)], ids=["lstm", "lnlstm", "rnn"])
def test_graph_matches_eager_across_calls_and_shapes(cell, ln):
    """Fresh tensors of one shape replay one graph (copy in, replay, clone out) and give the eager
    results each time; another shape or lengths get their own graph."""
    for seed, (T, B, H, lengths) in enumerate([(7, 5, 48, None), (7, 5, 48, None), (7, 5, 48, None),
                                               (4, 3, 33, [4, 1, 0]), (4, 3, 33, [2, 4, 3])]):
        ins, lnp, L, ups = make(cell, T, B, 24, H, BF16, lengths, ln, seed)
        graphed = run(cell, "graph", ins, lnp, L, ups)
        eager = run(cell, "step", ins, lnp, L, ups)
        same(graphed, eager)
    assert len(_paths._graphs) == 4  # (fwd, bwd) x (two shapes); the lengths tensors share a key
    assert all(g is not None for g in _paths._graphs.values()), "a capture failed"


@requires_cuda
@pytest.mark.parametrize("cell,ln,H", [("lstm", False, 48), ("lstm", True, 48), ("lstm", True, 160),
                                      ("rnn", False, 48)], ids=["lstm", "lnlstm", "lnlstm-unfused", "rnn"])
def test_step_direct_launch_matches_triton_dispatch(cell, ln, H):
    """The step loops launch the bound kernel directly after each call's first step
    (kernels._common.StepLauncher): bit for bit Triton's kernel[grid] dispatch, and what a graph
    captures."""
    from fused_rnn.kernels import _common

    ins, lnp, L, ups = make(cell, 6, 5, 24, H, BF16, [6, 2, 0, 5, 3], ln)
    _common.LAUNCH_PATHS.clear()
    direct = run(cell, "step", ins, lnp, L, ups)
    assert set(_common.LAUNCH_PATHS.values()) == {"direct"}, _common.LAUNCH_PATHS
    with config.using(direct_launch=False):
        dispatched = run(cell, "step", ins, lnp, L, ups)
    assert set(_common.LAUNCH_PATHS.values()) == {"standard: options().direct_launch is off"}
    for i, (a, b) in enumerate(zip(direct, dispatched)):
        assert torch.equal(a, b), i
    same(run(cell, "graph", ins, lnp, L, ups), direct)


@requires_cuda
def test_graph_outputs_do_not_alias_later_replays():
    ins, lnp, L, ups = make("lstm", 5, 4, 16, 32, F32)
    first = run("lstm", "graph", ins, lnp, L, ups)
    keep = [t.clone() for t in first]
    ins2, _, _, ups2 = make("lstm", 5, 4, 16, 32, F32, seed=1)
    run("lstm", "graph", ins2, lnp, L, ups2)
    for a, b in zip(first, keep):
        assert torch.equal(a, b)


@requires_cuda
def test_graph_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_paths, "GRAPH_CACHE_MAX", 2)
    for H in (16, 24, 32):
        ins, lnp, L, ups = make("rnn", 3, 2, 8, H, F32)
        same(run("rnn", "graph", ins, lnp, L, ups), run("rnn", "step", ins, lnp, L, ups))
        assert len(_paths._graphs) <= 2


@requires_cuda
def test_graph_on_another_stream():
    ins, lnp, L, ups = make("lstm", 6, 4, 16, 32, BF16)
    eager = run("lstm", "step", ins, lnp, L, ups)
    run("lstm", "graph", ins, lnp, L, ups)  # captured on the default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = run("lstm", "graph", ins, lnp, L, ups)
    torch.cuda.current_stream().wait_stream(side)
    same(on_side, eager)


@requires_cuda
def test_no_nested_capture():
    """Inside the caller's own capture the graph path runs the eager step launches (which the
    caller's graph records) instead of starting a capture of its own."""
    ins, lnp, L, ups = make("rnn", 4, 3, 8, 16, F32)
    x, h0, w_ih, w_hh, b_ih, b_hh = ins
    with torch.no_grad():
        eager = RNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, None, "tanh", False, True, "step")
        RNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, None, "tanh", False, True, "graph")  # warm-up
        n = len(_paths._graphs)
        outer = torch.cuda.CUDAGraph()
        with torch.cuda.graph(outer):
            captured = RNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, None, "tanh", False, True, "graph")
        outer.replay()
    torch.cuda.synchronize()
    assert len(_paths._graphs) == n
    same(captured, eager)


@requires_cuda
def test_use_path_graph_covers_backward():
    ins, lnp, L, ups = make("lstm", 4, 3, 8, 16, BF16)
    with _paths.use_path("graph"):
        graphed = run("lstm", "auto", ins, lnp, L, ups)
    ops = {k[0] for k in _paths._graphs}
    assert ops == {"lstm_fwd", "lstm_bwd"}
    same(graphed, run("lstm", "step", ins, lnp, L, ups))
