"""backend="auto" on CPU tensors runs torch's own ATen RNN/LSTM ops (fused_rnn/aten.py) for what
torch.nn computes: the same results as torch.nn.LSTM / RNN / cells and as backend="reference",
forward and backward; the route is taken where it should be and nowhere else (layer norm,
backend="reference", TRITON_INTERPRET=1, torch.func transforms, torch.compile keep their paths).
Under TRITON_INTERPRET=1 (lane 2) auto keeps the reference path: the spies check that instead.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
import fused_rnn.aten
from conftest import INTERPRET

B, T, I, H, P = 3, 6, 5, 7, 4
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture
def aten_calls(monkeypatch):
    """The names of the ATen ops the route calls, in order."""
    calls = []
    real = fused_rnn.aten.call

    def spy(name, *args):
        calls.append(name)
        return real(name, *args)

    monkeypatch.setattr(fused_rnn.aten, "call", spy)
    return calls


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


CASES = {
    "lstm": ("LSTM", {}),
    "lstm_proj": ("LSTM", {"proj_size": P}),
    "lstm_2l_bi": ("LSTM", {"num_layers": 2, "bidirectional": True}),
    "lstm_bf": ("LSTM", {"batch_first": True}),
    "lstm_nobias": ("LSTM", {"bias": False, "num_layers": 2}),
    "lstm_proj_2l_bi": ("LSTM", {"proj_size": P, "num_layers": 2, "bidirectional": True, "batch_first": True}),
    "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
    "rnn_relu_2l_bi": ("RNN", {"nonlinearity": "relu", "num_layers": 2, "bidirectional": True}),
    "gru_2l_bi": ("GRU", {"num_layers": 2, "bidirectional": True}),
}


def _three(case, dtype):
    """torch.nn's layer, ours on auto and ours on reference, with the same weights."""
    kind, kw = CASES[case]
    ref = getattr(nn, kind)(I, H, **kw).to(dtype)
    auto = getattr(fused_rnn, kind)(I, H, **kw).to(dtype)
    oracle = getattr(fused_rnn, kind)(I, H, **kw, backend="reference").to(dtype)
    auto.load_state_dict(ref.state_dict())
    oracle.load_state_dict(ref.state_dict())
    return ref, auto, oracle


def _inputs(m, dtype, with_hx, packed):
    D = 2 if m.bidirectional else 1
    x = torch.randn((B, T, I) if m.batch_first else (T, B, I), dtype=dtype, requires_grad=True)
    hx = None
    leaves = [x]
    if with_hx:
        h0 = torch.randn(m.num_layers * D, B, m.proj_size or H, dtype=dtype, requires_grad=True)
        c0 = torch.randn(m.num_layers * D, B, H, dtype=dtype, requires_grad=True)
        hx = (h0, c0) if m.mode == "LSTM" else h0
        leaves += [h0, c0] if m.mode == "LSTM" else [h0]
    inp = pack_padded_sequence(x, torch.tensor([4, T, 2]), batch_first=m.batch_first,
                               enforce_sorted=False) if packed else x
    return inp, hx, leaves


def _fwd_bwd(m, inp, hx, leaves):
    out, state = m(inp, hx)
    out = out.data if packed_out(out) else out
    states = list(state) if isinstance(state, tuple) else [state]
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    loss = loss + sum((s * s).sum() for s in states)
    grads = torch.autograd.grad(loss, leaves + list(m.parameters()), retain_graph=True)  # (the packing)
    return [out] + states + list(grads)


def packed_out(o):
    return isinstance(o, torch.nn.utils.rnn.PackedSequence)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zero_state", "hx"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_auto_matches_torch_nn_and_reference(case, with_hx, packed, dtype, aten_calls):
    """Outputs, final states and every gradient of auto equal torch.nn's and the reference's."""
    ref, auto, oracle = _three(case, dtype)
    inp, hx, leaves = _inputs(ref, dtype, with_hx, packed)
    want = _fwd_bwd(ref, inp, hx, leaves)
    got = _fwd_bwd(auto, inp, hx, leaves)
    assert aten_calls == ([] if INTERPRET else [fused_rnn.aten._SEQUENCE_OPS[auto.mode]])
    oracle_got = _fwd_bwd(oracle, inp, hx, leaves)
    assert len(aten_calls) == (0 if INTERPRET else 1)  # the reference never calls ATen's op
    for a, b, c in zip(got, want, oracle_got):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _err(a, b) <= TOL[dtype]
        assert _err(a, c) <= TOL[dtype] * (10 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(batch_first, aten_calls):
    ref, auto, _ = _three("lstm_2l_bi", torch.float64)
    ref.batch_first = auto.batch_first = batch_first
    x = torch.randn(T, I, dtype=torch.float64)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(x), auto(x)
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        assert a.shape == b.shape and _err(b, a) <= 1e-12
    assert len(aten_calls) == (0 if INTERPRET else 1)


@pytest.mark.parametrize("kind", ["LSTMCell", "RNNCell_tanh", "RNNCell_relu", "GRUCell"])
@pytest.mark.parametrize("batched", [True, False])
def test_cells(kind, batched, aten_calls):
    """The cells: torch's lstm_cell / rnn_*_cell, the same values and gradients as torch.nn's."""
    name, _, nl = kind.partition("_")
    kw = {"nonlinearity": nl} if nl else {}
    ref = getattr(nn, name)(I, H, **kw).double()
    auto = getattr(fused_rnn, name)(I, H, **kw).double()
    oracle = getattr(fused_rnn, name)(I, H, **kw, backend="reference").double()
    auto.load_state_dict(ref.state_dict())
    oracle.load_state_dict(ref.state_dict())
    x = torch.randn((B, I) if batched else (I,), dtype=torch.float64, requires_grad=True)
    for m in (ref, auto, oracle):
        out = m(x)
        outs = list(out) if isinstance(out, tuple) else [out]
        grads = torch.autograd.grad(sum((o * o).sum() for o in outs), [x] + list(m.parameters()))
        if m is ref:
            want = outs + list(grads)
        else:
            assert all(_err(a, b) <= 1e-12 for a, b in zip(outs + list(grads), want))
    want_op = {"LSTMCell": "lstm_cell", "GRUCell": "gru_cell"}.get(name, f"rnn_{nl}_cell")
    assert aten_calls == ([] if INTERPRET else [want_op])


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_gradcheck(kind):
    """fp64 gradcheck of the route on a tiny shape (2 layers, both directions, projections)."""
    kw = {"proj_size": 2} if kind == "LSTM" else {}
    m = getattr(fused_rnn, kind)(3, 4, num_layers=2, bidirectional=True, **kw).double()
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        out = torch.func.functional_call(m, dict(zip(names, params)), (x,))
        return out[0]

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in m.parameters()]))


def test_dropout_matches_torch_nn(aten_calls):
    """Dropout between layers in training: ATen's, the same mask stream as torch.nn's, and (on
    padded input) as fused_rnn's own loop, which drops each inner layer's output alike."""
    kw = dict(num_layers=3, dropout=0.5, bidirectional=True)
    ref = nn.LSTM(I, H, **kw)
    auto, oracle = fused_rnn.LSTM(I, H, **kw), fused_rnn.LSTM(I, H, **kw, backend="reference")
    auto.load_state_dict(ref.state_dict())
    oracle.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I)
    outs = []
    for m in (ref, auto, oracle):
        torch.manual_seed(5)
        outs.append(m(x)[0])
    assert _err(outs[1], outs[0]) <= 1e-5 and _err(outs[2], outs[0]) <= 1e-5
    torch.manual_seed(6)
    assert _err(auto(x)[0], outs[0]) > 1e-3  # another mask
    assert _err(auto.eval()(x)[0], ref.eval()(x)[0]) <= 1e-5
    assert len(aten_calls) == (0 if INTERPRET else 3)


def test_not_taken_for_layer_norm_or_reference(aten_calls):
    for m in (fused_rnn.LSTM(I, H, layer_norm=True), fused_rnn.LSTM(I, H, backend="reference"),
              fused_rnn.RNN(I, H, backend="reference"), fused_rnn.LSTMCell(I, H, layer_norm=True),
              fused_rnn.LSTMCell(I, H, backend="reference"), fused_rnn.RNNCell(I, H, backend="reference")):
        m(torch.randn(T, B, I) if isinstance(m, nn.RNNBase) else torch.randn(B, I))
    assert aten_calls == []


def test_not_taken_under_the_interpreter(aten_calls, monkeypatch):
    """TRITON_INTERPRET=1 tests the kernels on CPU: auto keeps the reference path there."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused_rnn.LSTM(I, H)(torch.randn(T, B, I))
    fused_rnn.RNNCell(I, H)(torch.randn(B, I))
    assert aten_calls == []


@pytest.mark.filterwarnings("ignore:fused_rnn. torch.func transforms")
def test_not_taken_under_torch_func(aten_calls):
    """A torch.func transform keeps the reference path (with its warning), and its gradients
    equal the route's."""
    m = fused_rnn.LSTM(I, H).double()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach() for p in m.parameters()]
    x = torch.randn(T, B, I, dtype=torch.float64)

    def loss(params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x,))[0].pow(2).sum()

    g = torch.func.grad(loss)(params)
    assert aten_calls == []
    want = torch.autograd.grad(m(x)[0].pow(2).sum(), list(m.parameters()))
    assert len(aten_calls) == (0 if INTERPRET else 1)
    assert all(_err(a, b) <= 1e-12 for a, b in zip(g, want))


def test_mixed_dtypes_under_autocast(aten_calls):
    """Under CPU autocast (bf16) the route runs in the autocast dtype, as torch.nn does."""
    ref, auto, _ = _three("lstm_2l_bi", torch.float32)
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ref(x)[0], auto(x)[0]
    assert a.dtype == b.dtype == torch.bfloat16
    assert _err(b.float(), a.float()) <= 2e-2


def test_cpu_table_runs(capsys):
    """`fused-rnn bench --device cpu --cpu-table`'s code on tiny rows: a markdown row per case with
    every column (the timings themselves are the benchmark's, never asserted here)."""
    import io

    from fused_rnn.bench import cpu, main

    rows = [cpu.Row("tiny LSTM", "LSTM", 2, 3, 4, 5, {"num_layers": 2, "bidirectional": True}, packed=True),
            cpu.Row("tiny LN-LSTM", "LSTM", 2, 3, 4, 5, layer_norm=True),
            cpu.Row("tiny RNN", "RNN", 2, 3, 4, 5, {"nonlinearity": "relu"}),
            cpu.Row("tiny bi-LSTM", "LSTM", 2, 3, 4, 5, {"bidirectional": True})]
    buf = io.StringIO()
    results = cpu.run(rows, reps=1, reference=True, out=buf)
    text = buf.getvalue()
    assert "torch.nn ms | fused_rnn (auto) ms | whole-seq ms | reference ms" in text
    for r, (row, t) in zip(rows, results):
        assert row is r and f"| {r.label} |" in text and all(v > 0 for v in t.values())
        assert ("whole-seq" in t) == (r.label == "tiny bi-LSTM")  # padded plain LSTM rows only
    with pytest.raises(SystemExit):  # the table is the CPU's
        main(["--cpu-table", "--device", "cuda" if torch.cuda.is_available() else "auto"])
    assert "--cpu-table runs on the CPU" in capsys.readouterr().err
