"""backend="auto" on CPU tensors: the layer-norm LSTM's whole-sequence route
(fused_rnn/cpu_lstm.py) and the functional API's routing (lstm_sequence / rnn_sequence: ATen
for what torch.nn computes, fused_rnn/aten.py). Values and every gradient against the
reference loop, fp64 gradcheck, double backward, and where each route is taken.
TRITON_INTERPRET=1 keeps auto off these routes (lane 2 tests the kernels): the ``cpu_auto``
fixture lifts it for a test, so that both lanes test the routes themselves.
"""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
import fused_rnn.aten
import fused_rnn.cpu_lstm
from fused_rnn.reference import lstm_sequence_ref

B, T, I, H = 3, 5, 4, 6
F64 = torch.float64


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def cpu_auto(monkeypatch):
    """auto takes the CPU routes in this test (also in lane 2); returns the calls of the
    layer-norm route and of ATen's ops, by name, in order."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    real_ln, real_aten = fused_rnn.cpu_lstm.lstm_sequence_cpu, fused_rnn.aten.call

    def spy_ln(*args, **kw):
        calls.append("cpu_lstm")
        return real_ln(*args, **kw)

    def spy_aten(name, *args):
        calls.append(name)
        return real_aten(name, *args)

    monkeypatch.setattr(fused_rnn.cpu_lstm, "lstm_sequence_cpu", spy_ln)
    monkeypatch.setattr(fused_rnn.aten, "call", spy_aten)
    return calls


def _ln_args(dtype, lengths=None, bias=True):
    g = torch.Generator().manual_seed(3)

    def r(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    x, h0, c0 = r(T, B, I, scale=1.0), r(B, H), r(B, H)
    w_ih, w_hh = r(4 * H, I), r(4 * H, H)
    b_ih, b_hh = (r(4 * H), r(4 * H)) if bias else (None, None)
    ln = (1 + r(4 * H, scale=0.3), r(4 * H, scale=0.3), 1 + r(H, scale=0.3), r(H, scale=0.3))
    ln = tuple(p.detach().requires_grad_() for p in ln)
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths


def _leaves(args):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, _ = args
    return [t for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh) + ln if t is not None]


def _values_and_grads(fn, args, create_graph=False):
    out, h, c = fn(*args)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * w).sum() + (h * h).sum() + (c * c.flip(0)).sum()
    return [out, h, c] + list(torch.autograd.grad(loss, _leaves(args), create_graph=create_graph))


LENGTHS = {"full": None, "varlen": [5, 2, 0]}


@pytest.mark.parametrize("dtype, lengths, bias", [
    pytest.param(F64, "full", True, id="fp64-full"), pytest.param(F64, "varlen", False, id="fp64-varlen-nobias"),
    pytest.param(torch.float32, "full", False, id="fp32-full-nobias"),
    pytest.param(torch.float32, "varlen", True, id="fp32-varlen")])
def test_ln_route_matches_reference(dtype, lengths, bias, cpu_auto):
    """fused_rnn.lstm_sequence(..., ln) on auto: the whole-sequence route, the reference's values
    and gradients (every input, LayerNorm parameters included); NaN padding reaches nothing."""
    lens = LENGTHS[lengths]
    args = _ln_args(dtype, None if lens is None else torch.tensor(lens), bias)
    if lens is not None:
        with torch.no_grad():
            args[0][3:, 1] = float("nan")  # past sequence 1's end (and all of sequence 2)
            args[0][:, 2] = float("nan")
    want = _values_and_grads(lambda *a: lstm_sequence_ref(*a), args)
    got = _values_and_grads(lambda *a: fused_rnn.lstm_sequence(*a, backend="auto"), args)
    assert cpu_auto == ["cpu_lstm"]
    tol = 1e-12 if dtype == F64 else 1e-5
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.isfinite(a).all()
        assert _err(a, b) <= tol


@pytest.mark.parametrize("ln", [True, False], ids=["ln", "plain"])
def test_gradcheck(ln):
    """fp64 gradcheck of the whole-sequence Function (every input, variable lengths with a 0)."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, lnp, _ = _ln_args(F64)
    lengths = torch.tensor([3, 0, 2])
    k = 3  # hidden size 3 (rows of each gate's block, columns of w_hh)
    rows = torch.arange(4 * H).view(4, H)[:, :k].reshape(-1)
    small = lambda t: t.detach().requires_grad_()  # noqa: E731
    inputs = (small(x[:3, :, :2]), small(h0[:, :k]), small(c0[:, :k]), small(w_ih[rows, :2]), small(w_hh[rows, :k]),
              small(b_ih[rows]), small(b_hh[rows]))
    if ln:
        inputs += (small(lnp[0][rows]), small(lnp[1][rows]), small(lnp[2][:k]), small(lnp[3][:k]))

    def f(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *p):
        return fused_rnn.cpu_lstm.lstm_sequence_cpu(x, h0, c0, w_ih, w_hh, b_ih, b_hh, p or None, lengths)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_double_backward_matches_reference(cpu_auto):
    """Second derivatives through the route (create_graph=True: the reference's differentiable
    backward, _backend.double_backward_via) equal the reference's."""
    args = _ln_args(F64, torch.tensor([5, 3, 1]))
    got = _values_and_grads(lambda *a: fused_rnn.lstm_sequence(*a), args, create_graph=True)
    want = _values_and_grads(lambda *a: lstm_sequence_ref(*a), args, create_graph=True)
    leaves = _leaves(args)
    g2 = torch.autograd.grad(sum((g * g).sum() for g in got[3:]), leaves)
    w2 = torch.autograd.grad(sum((g * g).sum() for g in want[3:]), leaves)
    assert all(_err(a, b) <= 1e-10 for a, b in zip(g2, w2))


LAYERS = {
    "1l": {},
    "2l_bi_packed": {"num_layers": 2, "bidirectional": True},
    "bf_hx": {"batch_first": True},
}


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_ln_layer_matches_reference(case, cpu_auto):
    """fused_rnn.LSTM(layer_norm=True) on auto against backend="reference": outputs, states and
    every gradient (1-2 layers, bidirectional, PackedSequence, batch_first, h0/c0)."""
    kw = LAYERS[case]
    torch.manual_seed(0)
    auto = fused_rnn.LSTM(I, H, layer_norm=True, **kw).double()
    oracle = fused_rnn.LSTM(I, H, layer_norm=True, backend="reference", **kw).double()
    with torch.no_grad():
        for p in auto.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorm parameters off their 1 / 0 init
    oracle.load_state_dict(auto.state_dict())
    D = 2 if auto.bidirectional else 1
    x = torch.randn((B, T, I) if auto.batch_first else (T, B, I), dtype=F64, requires_grad=True)
    leaves, hx = [x], None
    if case == "bf_hx":
        hx = tuple(torch.randn(D, B, H, dtype=F64, requires_grad=True) for _ in range(2))
        leaves += list(hx)
    inp = pack_padded_sequence(x, torch.tensor([3, T, 1]), enforce_sorted=False) if "packed" in case else x
    res = []
    for m in (auto, oracle):
        out, (h, c) = m(inp, hx)
        out = getattr(out, "data", out)
        loss = (out * out.detach().sin()).sum() + h.sum() + (c * c).sum()
        grads = torch.autograd.grad(loss, leaves + list(m.parameters()), retain_graph=True)  # (the packing)
        res.append([out, h, c] + list(grads))
    assert cpu_auto == ["cpu_lstm"] * (auto.num_layers * D)
    assert all(_err(a, b) <= 1e-12 for a, b in zip(*res))


def test_routes_not_taken(cpu_auto, monkeypatch):
    """backend="reference" stays the loop; 16-bit inputs and the projection with layer norm run
    the reference loop on auto; under TRITON_INTERPRET=1 auto keeps off the CPU routes."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, _ = _ln_args(torch.float32)
    fused_rnn.lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, backend="reference")
    fused_rnn.rnn_sequence(x, h0, w_ih[:H], w_hh[:H], backend="reference")
    assert cpu_auto == []
    bf = [t.detach().bfloat16() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
    got = fused_rnn.lstm_sequence(*bf, tuple(p.detach().bfloat16() for p in ln))
    want = lstm_sequence_ref(*bf, tuple(p.detach().bfloat16() for p in ln))
    assert cpu_auto == ["cpu_lstm"] and all(torch.equal(a, b) for a, b in zip(got, want))
    w_hr = torch.randn(2, H)
    fused_rnn.lstm_sequence(x, h0[:, :2], c0, w_ih, w_hh[:, :2], b_ih, b_hh, ln, w_hr=w_hr)
    assert cpu_auto == ["cpu_lstm"]
    out, h, c = fused_rnn.lstm_sequence(x[:0], h0, c0, w_ih, w_hh, b_ih, b_hh, ln)  # T = 0: the loop
    (h.sum() + c.sum()).backward()
    assert out.shape == (0, B, H) and torch.equal(h, h0) and torch.equal(h0.grad, torch.ones_like(h0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_rnn._backend.aten_route("auto", x) is False


FUNCTIONAL = {
    "lstm": ("lstm", {}),
    "lstm_proj": ("lstm", {"proj": 2}),
    "lstm_one_bias": ("lstm", {"one_bias": True}),
    "rnn_tanh": ("rnn_tanh", {}),
    "rnn_relu": ("rnn_relu", {}),
    "gru": ("gru", {}),
    "gru_one_bias": ("gru", {"one_bias": True}),
}


@pytest.mark.parametrize("lengths", sorted(LENGTHS) + ["varlen_nonzero"])
@pytest.mark.parametrize("case", sorted(FUNCTIONAL))
def test_functional_api_takes_aten(case, lengths, cpu_auto):
    """lstm_sequence / rnn_sequence on auto without layer norm: ATen's op (lengths through a
    PackedSequence; a length 0, which a PackedSequence cannot hold, keeps the reference loop),
    the reference's values and gradients."""
    op, kw = FUNCTIONAL[case]
    lens = {"full": None, "varlen": [5, 2, 0], "varlen_nonzero": [2, 5, 1]}[lengths]
    lstm = op == "lstm"
    G, P = {"lstm": 4 * H, "gru": 3 * H}.get(op, H), kw.get("proj", H)
    g = torch.Generator().manual_seed(1)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=F64) * 0.5).requires_grad_()  # noqa: E731
    x, h0, c0, w_ih, w_hh = r(T, B, I), r(B, P), r(B, H), r(G, I), r(G, P)
    b_ih, b_hh = r(G), (None if kw.get("one_bias") else r(G))
    w_hr = r(P, H) if "proj" in kw else None
    lt = None if lens is None else torch.tensor(lens)
    nl = op.partition("_")[2]
    leaves = [t for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) if t is not None and (lstm or t is not c0)]
    res = []
    for backend in ("auto", "reference"):
        if lstm:
            outs = fused_rnn.lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, lt, backend, w_hr)
        elif op == "gru":
            outs = fused_rnn.gru_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, lt, backend)
        else:
            outs = fused_rnn.rnn_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, lt, nl, backend)
        loss = sum((o * o.detach().cos()).sum() for o in outs)
        res.append(list(outs) + list(torch.autograd.grad(loss, leaves)))
    assert cpu_auto == ([] if lengths == "varlen" else [op])
    assert all(a.shape == b.shape and _err(a, b) <= 1e-12 for a, b in zip(*res))
