"""fused_rnn.LSTM / RNN / LSTMCell / RNNCell against torch.nn with the same state_dict.

Every combination runs on the reference backend; a subset also runs through the Triton kernels
where they can run here (a GPU, or the CPU under TRITON_INTERPRET=1).
"""
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from conftest import kernel_device, rel_err
from fused_rnn.reference import lstm_cell_ref

B, T, I, H = 3, 7, 5, 11
P = 4  # proj_size of "lstm_proj": h (and the output) P wide, c H wide

CELLS = {
    "lstm": (nn.LSTM, fused_rnn.LSTM, {}),
    "lstm_proj": (nn.LSTM, fused_rnn.LSTM, {"proj_size": P}),
    "rnn_tanh": (nn.RNN, fused_rnn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, fused_rnn.RNN, {"nonlinearity": "relu"}),
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _pair(cell, dtype, device, backend, **kw):
    nn_cls, our_cls, extra = CELLS[cell]
    ref = nn_cls(I, H, **extra, **kw).to(device=device, dtype=dtype)
    ours = our_cls(I, H, **extra, **kw, backend=backend).to(device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(module, x, hx, is_lstm):
    out, state = module(x, hx)
    if is_lstm:
        return out, state[0], state[1]
    return out, state, None


def _h_width(cell):
    return CELLS[cell][2].get("proj_size") or H


def _compare(cell, num_layers, bidirectional, batch_first, with_hx, packed, dtype, backend, device):
    is_lstm = cell.startswith("lstm")
    ref, ours = _pair(cell, dtype, device, backend, num_layers=num_layers,
                      bidirectional=bidirectional, batch_first=batch_first)
    D = 2 if bidirectional else 1
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(shape, dtype=dtype, device=device)
    hx = None
    leaves = []
    if with_hx:
        h0 = torch.randn(num_layers * D, B, _h_width(cell), dtype=dtype, device=device)
        c0 = torch.randn(num_layers * D, B, H, dtype=dtype, device=device)
        hx = (h0, c0) if is_lstm else h0
        leaves = [h0, c0] if is_lstm else [h0]
    lengths = torch.tensor([T, 2, 5])
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_(True)
        hxi = None
        if hx is not None:
            hxi = tuple(t.clone().requires_grad_(True) for t in leaves)
            hxi_arg = hxi if is_lstm else hxi[0]
        inp = pack_padded_sequence(xi, lengths, batch_first=batch_first, enforce_sorted=False) if packed else xi
        out, h_n, c_n = _run(m, inp, hxi_arg if hx is not None else None, is_lstm)
        out_t = out.data if packed else out
        g = torch.Generator().manual_seed(1)
        dout = torch.randn(out_t.shape, generator=g, dtype=dtype).to(device)
        loss = (out_t * dout).sum() + (h_n * torch.randn(h_n.shape, generator=g, dtype=dtype).to(device)).sum()
        if c_n is not None:
            loss = loss + (c_n * torch.randn(c_n.shape, generator=g, dtype=dtype).to(device)).sum()
        loss.backward()
        grads = {"x": xi.grad}
        if hxi is not None:
            grads.update({f"hx{i}": t.grad for i, t in enumerate(hxi)})
        grads.update({n: p.grad for n, p in m.named_parameters()})
        results.append(((out_t, h_n, c_n), grads, out))
    (r_out, r_grads, r_raw), (o_out, o_grads, o_raw) = results
    tol = TOL[dtype]
    for name, a, b in zip(("out", "h_n", "c_n"), o_out, r_out):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    if packed:
        assert torch.equal(o_raw.batch_sizes, r_raw.batch_sizes)
        assert torch.equal(o_raw.sorted_indices, r_raw.sorted_indices)
    assert set(o_grads) == set(r_grads)
    for name in r_grads:
        assert o_grads[name] is not None, name
        assert rel_err(o_grads[name], r_grads[name]) <= tol, (name, rel_err(o_grads[name], r_grads[name]))


FULL = list(itertools.product(CELLS, (1, 2, 3), (False, True), (False, True), (False, True), (False, True)))


def _id(c):
    cell, L, bi, bf, hx, packed = c
    return f"{cell}-L{L}" + ("-bi" if bi else "") + ("-bf" if bf else "") + ("-hx" if hx else "") + ("-packed" if packed else "")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("combo", FULL, ids=[_id(c) for c in FULL])
def test_reference_matches_torch_nn(combo, dtype):
    _compare(*combo, dtype=dtype, backend="reference", device="cpu")


# Through the kernels: every cell, each feature at least once, kept small for the interpreter.
KERNEL_COMBOS = [
    ("lstm", 1, False, False, True, False),
    ("lstm", 2, True, True, False, True),
    ("lstm", 1, True, False, True, True),
    ("rnn_tanh", 2, True, False, True, False),
    ("rnn_tanh", 1, False, True, False, True),
    ("rnn_relu", 1, True, False, True, True),
    ("lstm_proj", 1, False, False, True, False),
    ("lstm_proj", 2, True, True, True, True),
]


@pytest.mark.skipif(kernel_device() is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("combo", KERNEL_COMBOS, ids=[_id(c) for c in KERNEL_COMBOS])
def test_triton_layers_match_torch_nn(combo):
    dev = kernel_device()
    # fp64 so that the comparison with torch.nn is tight on any device (no TF32 involved).
    _compare(*combo, dtype=torch.float64, backend="triton", device=dev)


def test_state_dict_keys_identical():
    for cell, (nn_cls, our_cls, extra) in CELLS.items():
        for kw in ({}, {"num_layers": 2, "bidirectional": True}, {"bias": False}):
            ref = nn_cls(I, H, **extra, **kw)
            ours = our_cls(I, H, **extra, **kw)
            assert list(ours.state_dict()) == list(ref.state_dict()), (cell, kw)
            for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
                assert n1 == n2 and p1.shape == p2.shape
    for ours, ref in ((fused_rnn.LSTMCell(I, H), nn.LSTMCell(I, H)), (fused_rnn.RNNCell(I, H), nn.RNNCell(I, H))):
        assert list(ours.state_dict()) == list(ref.state_dict())


def test_layer_norm_params_are_extra_entries():
    m = fused_rnn.LSTM(I, H, num_layers=2, bidirectional=True, layer_norm=True)
    base = list(nn.LSTM(I, H, num_layers=2, bidirectional=True).state_dict())
    keys = list(m.state_dict())
    assert keys[: len(base)] == base
    extra = keys[len(base):]
    assert len(extra) == 16
    assert m.ln_gate_weight_l1_reverse.shape == (4 * H,)
    assert m.ln_cell_bias_l0.shape == (H,)
    assert torch.equal(m.ln_gate_weight_l0, torch.ones(4 * H))
    assert torch.equal(m.ln_cell_bias_l1, torch.zeros(H))
    m.reset_parameters()
    assert torch.equal(m.ln_cell_weight_l0, torch.ones(H))


def test_bias_false_matches():
    for cell in CELLS:
        ref, ours = _pair(cell, torch.float64, "cpu", "reference", bias=False, num_layers=2)
        x = torch.randn(T, B, I, dtype=torch.float64)
        a, b = ref(x)[0], ours(x)[0]
        assert rel_err(b, a) < 1e-12


@pytest.mark.parametrize("cell", list(CELLS))
def test_unbatched_input(cell):
    ref, ours = _pair(cell, torch.float64, "cpu", "reference", num_layers=2, bidirectional=True)
    W = _h_width(cell)
    x = torch.randn(T, I, dtype=torch.float64)
    h0 = torch.randn(4, W, dtype=torch.float64)
    hx = (h0, torch.randn(4, H, dtype=torch.float64)) if cell.startswith("lstm") else h0
    r, o = ref(x, hx), ours(x, hx)
    assert o[0].shape == r[0].shape == (T, 2 * W)
    assert rel_err(o[0], r[0]) < 1e-12
    if cell.startswith("lstm"):
        assert o[1][0].shape == (4, W) and o[1][1].shape == (4, H)
        assert rel_err(o[1][0], r[1][0]) < 1e-12 and rel_err(o[1][1], r[1][1]) < 1e-12
    else:
        assert o[1].shape == (4, H)
        assert rel_err(o[1], r[1]) < 1e-12


EMPTY_BACKENDS = ["reference"] + (["triton"] if kernel_device() is not None else [])


@pytest.mark.parametrize("backend", EMPTY_BACKENDS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_empty_batch_runs_as_in_torch_nn(cell, backend):
    """A batch of 0 sequences runs as torch.nn's does on the CPU: empty outputs and states of
    the right shapes, zero weight gradients (the triton backend falls back to the reference path
    for an empty problem, with its warning)."""
    device = "cpu" if backend == "reference" else kernel_device()
    ref, ours = _pair(cell, torch.float64, device, backend, num_layers=2, bidirectional=True)
    ref = ref.cpu()  # cuDNN's own handling of B = 0 is not what this compares against
    W = _h_width(cell)
    outs = []
    for m in (ref, ours):
        x = torch.randn(T, 0, I, dtype=torch.float64, device=next(m.parameters()).device)
        out, state = m(x)
        states = state if cell.startswith("lstm") else (state,)
        (out.sum() + sum(s.sum() for s in states)).backward()
        outs.append((out, states, [p.grad for p in m.parameters()]))
    (ro, rs, rg), (oo, os_, og) = outs
    assert oo.shape == ro.shape == (T, 0, 2 * W) and oo.dtype == ro.dtype
    assert [s.shape for s in os_] == [s.shape for s in rs]
    assert os_[0].shape == (4, 0, W)
    for a, b in zip(rg, og):
        assert b is not None and b.shape == a.shape and torch.equal(b.cpu(), a)  # all zeros
    assert len(og) == len(rg)


@pytest.mark.parametrize("backend", EMPTY_BACKENDS)
@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_cells_take_an_empty_batch(cell, backend):
    device = "cpu" if backend == "reference" else kernel_device()
    ref = nn.LSTMCell(I, H) if cell == "lstm" else nn.RNNCell(I, H)
    ours = (fused_rnn.LSTMCell if cell == "lstm" else fused_rnn.RNNCell)(I, H, backend=backend)
    ours.load_state_dict(ref.state_dict())
    ours.to(device)
    o = ours(torch.randn(0, I, device=device))
    r = ref(torch.randn(0, I))
    o, r = (o, r) if cell == "lstm" else ((o,), (r,))
    assert [t.shape for t in o] == [t.shape for t in r] == [(0, H)] * len(r)
    sum(t.sum() for t in o).backward()
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


def test_dropout_between_layers():
    ref, ours = _pair("lstm", torch.float64, "cpu", "reference", num_layers=3, dropout=0.5)
    x = torch.randn(T, B, I, dtype=torch.float64)
    ref.eval(), ours.eval()
    assert rel_err(ours(x)[0], ref(x)[0]) < 1e-12  # eval: no dropout
    ours.train()
    torch.manual_seed(3)
    a = ours(x)[0]
    torch.manual_seed(3)
    b = ours(x)[0]
    torch.manual_seed(4)
    c = ours(x)[0]
    assert torch.equal(a, b)  # same RNG, same mask
    assert not torch.allclose(a, c)  # a different mask changes the output
    assert rel_err(a, ref.eval()(x)[0]) > 1e-3


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("batched", [True, False])
def test_cells_match_torch_nn(cell, batched):
    if cell == "lstm":
        ref, ours = nn.LSTMCell(I, H).double(), fused_rnn.LSTMCell(I, H).double()
    else:
        nl = cell.split("_")[1]
        ref, ours = nn.RNNCell(I, H, nonlinearity=nl).double(), fused_rnn.RNNCell(I, H, nonlinearity=nl).double()
    ours.load_state_dict(ref.state_dict())
    shape = (B, I) if batched else (I,)
    sshape = (B, H) if batched else (H,)
    x = torch.randn(shape, dtype=torch.float64)
    for with_hx in (False, True):
        hx = None
        if with_hx:
            h0 = torch.randn(sshape, dtype=torch.float64)
            hx = (h0, torch.randn(sshape, dtype=torch.float64)) if cell == "lstm" else h0
        r, o = ref(x, hx), ours(x, hx)
        if cell == "lstm":
            assert o[0].shape == r[0].shape
            assert rel_err(o[0], r[0]) < 1e-12 and rel_err(o[1], r[1]) < 1e-12
        else:
            assert o.shape == r.shape and rel_err(o, r) < 1e-12


def test_cell_gradients_match_torch_nn():
    ref, ours = nn.LSTMCell(I, H).double(), fused_rnn.LSTMCell(I, H).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, I, dtype=torch.float64)
    h0, c0 = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    grads = []
    for m in (ref, ours):
        leaves = [t.clone().requires_grad_(True) for t in (x, h0, c0)]
        h, c = m(leaves[0], (leaves[1], leaves[2]))
        (h.sum() + 2 * c.sum()).backward()
        grads.append([t.grad for t in leaves] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert rel_err(b, a) < 1e-12


def test_autocast_cpu_runs_in_autocast_dtype():
    m = fused_rnn.LSTM(I, H, num_layers=2)
    ref = nn.LSTM(I, H, num_layers=2)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(T, B, I)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x)
    assert out.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    assert m.weight_ih_l0.dtype == torch.float32  # parameters stay fp32
    out.float().sum().backward()
    assert m.weight_ih_l0.grad.dtype == torch.float32
    assert rel_err(out, ref(x)[0]) < 2e-2


def test_bad_backend_and_proj_size():
    with pytest.raises(ValueError, match="backend"):
        fused_rnn.LSTM(I, H, backend="cudnn")
    with pytest.raises(ValueError, match="proj_size"):
        fused_rnn.LSTM(I, H, proj_size=H)  # nn.LSTM's own check: proj_size < hidden_size
    with pytest.raises(ValueError, match="proj_size"):
        fused_rnn.RNN(I, H, proj_size=3)


def test_proj_size_state_shapes_are_checked():
    m = fused_rnn.LSTM(I, H, num_layers=2, proj_size=P)
    x = torch.randn(T, B, I)
    h_p, c_h = torch.zeros(2, B, P), torch.zeros(2, B, H)
    out, (h, c) = m(x, (h_p, c_h))
    assert out.shape == (T, B, P) and h.shape == (2, B, P) and c.shape == (2, B, H)
    # torch.nn's RuntimeError and message
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 3, 4\), got \[2, 3, 11\]"):
        m(x, (torch.zeros(2, B, H), c_h))  # h_0 H wide: it is P wide with a projection
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(2, 3, 11\), got \[2, 3, 4\]"):
        m(x, (h_p, torch.zeros(2, B, P)))  # c_0 stays H wide


def test_proj_size_with_layer_norm_projects_the_layer_norm_cell():
    """layer_norm=True with proj_size: the seed's layer-norm cell, then h = W_hr h_cell."""
    torch.manual_seed(0)
    m = fused_rnn.LSTM(I, H, proj_size=P, layer_norm=True, backend="reference").double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith("ln_"):
                p.normal_()  # not the identity init: the LN parameters must matter
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, (h_n, c_n) = m(x)
    assert set(dict(m.named_parameters())) >= {"weight_hr_l0", "ln_cell_weight_l0"}
    h, c = torch.zeros(B, P, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)
    ln = (m.ln_gate_weight_l0, m.ln_gate_bias_l0, m.ln_cell_weight_l0, m.ln_cell_bias_l0)
    for t in range(T):
        g = x[t] @ m.weight_ih_l0.t() + m.bias_ih_l0 + m.bias_hh_l0 + h @ m.weight_hh_l0.t()
        h_cell, c = lstm_cell_ref(g, c, ln)
        h = h_cell @ m.weight_hr_l0.t()
        assert rel_err(out[t], h) < 1e-12
    assert rel_err(h_n[0], h) < 1e-12 and rel_err(c_n[0], c) < 1e-12
    out.sum().backward()
    assert m.weight_hr_l0.grad is not None and m.ln_cell_weight_l0.grad.abs().sum() > 0


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = fused_rnn.LSTM(I, H, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        m(torch.randn(T, B, I))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_autocast_cuda_runs_kernels_in_autocast_dtype(cell, dtype):
    ref, ours = _pair(cell, torch.float32, "cuda", "auto", num_layers=2)
    x = torch.randn(T, B, I, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out, _ = ours(x)
        ref_out, _ = ref(x)
    assert out.dtype == dtype == ref_out.dtype
    assert ours.weight_hh_l0.dtype == torch.float32  # parameters stay fp32
    out.float().sum().backward()
    assert ours.weight_hh_l0.grad.dtype == torch.float32
    exact = ref.float()(x)[0]
    assert rel_err(out, exact) < 2e-2
