"""The LSTM with projections (nn.LSTM's proj_size) through its kernels (fused_rnn.kernels.lstm_proj
via fused_rnn.lstm_proj.LSTMProjFunction) against the reference path.

Where the kernels can run: a CUDA GPU, or the CPU under TRITON_INTERPRET=1. Launcher buffers are
NaN-poisoned (options().poison), so an element a kernel or a product leaves unwritten fails
the comparison. Tolerances are relative to an fp64 reference (conftest.tol).
"""
from collections import OrderedDict

import pytest
import torch

from conftest import (
    BF16, DT_NAME, F16, F32, F64, HAS_CUDA, assert_close, assert_matches_reference, fwd_bwd, kernel_device, rel_err,
    requires_kernels, tol,
)
from fused_rnn import _backend, _paths
from fused_rnn import lstm as lstm_mod
from fused_rnn.lstm import lstm_sequence
from fused_rnn.lstm_proj import LSTMProjFunction
from fused_rnn.kernels import config
from fused_rnn.reference import lstm_sequence_ref

pytestmark = [requires_kernels, pytest.mark.usefixtures("poison")]
DEV = kernel_device()
NAMES = ["x", "h0", "c0", "w_ih", "w_hh", "w_hr", "b_ih", "b_hh", "ln_gw", "ln_gb", "ln_cw", "ln_cb"]
OUT_NAMES = ["out", "h_n", "c_n"]


def make_case(T, B, I, H, P, dtype, ln, bias=True, lengths=None, seed=0):
    """[x, h0 [B,P], c0 [B,H], w_ih, w_hh [4H,P], w_hr [P,H], b_ih, b_hh, (LN params)] in dtype on
    DEV, lengths, and the upstream gradients (dout [T,B,P], dh_n [B,P], dc_n [B,H])."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(device=DEV, dtype=dtype)

    k = 2.0 / P ** 0.5
    ins = [r(T, B, I), r(B, P), r(B, H), r(4 * H, I, scale=k), r(4 * H, P, scale=k), r(P, H, scale=1.5 / H ** 0.5)]
    ins += [r(4 * H, scale=k), r(4 * H, scale=k)] if bias else [None, None]
    if ln:
        ins += [r(4 * H, scale=0.2, shift=1.0), r(4 * H, scale=0.2), r(H, scale=0.2, shift=1.0), r(H, scale=0.2)]
    L = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=DEV)
    return ins, L, (r(T, B, P), r(B, P), r(B, H))


def kernels_fn(path="auto"):
    def fn(ins, L):
        x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, *ln = ins
        lnp = ln if ln else [None] * 4
        return LSTMProjFunction.apply(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, *lnp, L, config.LN_EPS, False, path)

    return fn


def reference_fn(ins, L):
    x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, *ln = ins
    return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(ln) if ln else None, L, w_hr=w_hr)


# (id, T, B, I, H, P, lengths, bias): B 17 spans two row blocks; a zero length and one > T; T 1;
# P 1; no bias
SHAPES = [
    ("B3-T7-H37-P10-len", 7, 3, 5, 37, 10, [7, 3, 0], True),
    ("B17-T3-H20-P13-len", 3, 17, 4, 20, 13, [3, 1, 2, 3, 0, 1, 2, 3, 3, 2, 1, 5, 2, 2, 1, 3, 1], True),
    ("B5-T1-H16-P1", 1, 5, 5, 16, 1, None, True),
    ("B2-T4-H7-P3-nobias", 4, 2, 3, 7, 3, None, False),
]
if DEV is not None and DEV.type == "cuda":
    SHAPES += [("B64-T33-H200-P96-len", 33, 64, 48, 200, 96, [33 - b % 7 for b in range(64)], True),
               ("B192-T6-H384-P128", 6, 192, 32, 384, 128, None, True)]
    DTYPES = [F64, F32, F16, BF16]
else:
    DTYPES = [F64, F32]


def _cases():
    for sid, T, B, I, H, P, lengths, bias in SHAPES:
        for dtype in DTYPES:
            for cell in ("lstm", "lnlstm"):
                yield pytest.param(T, B, I, H, P, lengths, bias, dtype, cell, id=f"{sid}-{DT_NAME[dtype]}-{cell}")
    if DEV is not None and DEV.type == "cpu":  # half precisions through the interpreter: one shape
        for dtype in (F16, BF16):
            for cell in ("lstm", "lnlstm"):
                yield pytest.param(5, 3, 5, 37, 10, [5, 2, 0], True, dtype, cell,
                                   id=f"B3-T5-H37-P10-len-{DT_NAME[dtype]}-{cell}")


@pytest.mark.parametrize("T,B,I,H,P,lengths,bias,dtype,cell", list(_cases()))
def test_lstm_proj_matches_reference(T, B, I, H, P, lengths, bias, dtype, cell):
    ins, L, ups = make_case(T, B, I, H, P, dtype, cell == "lnlstm", bias, lengths)
    outs = assert_matches_reference(kernels_fn(), reference_fn, ins, L, ups, NAMES, OUT_NAMES)
    assert [o.shape for o in outs] == [(T, B, P), (B, P), (B, H)]


@pytest.mark.parametrize("cell", ["lstm", "lnlstm"])
def test_lstm_proj_gradcheck(cell):
    """fp64 gradcheck of the hand-written backward for every input, with a finished sequence and
    a zero-length one (dh_n passes through to h0). Through the interpreter: gradcheck's fast mode."""
    ins, L, _ = make_case(3, 3, 2, 4, 2, F64, cell == "lnlstm", True, [3, 1, 0])
    leaves = [t.detach().requires_grad_() for t in ins]
    fn = kernels_fn()
    assert torch.autograd.gradcheck(lambda *a: fn(list(a), L), leaves, fast_mode=DEV.type == "cpu")


def test_lstm_sequence_takes_the_projection_kernels(monkeypatch):
    """lstm_sequence(w_hr=...) on the kernel backend runs LSTMProjFunction, never the reference."""
    def no_reference(*a, **k):
        raise AssertionError("the reference path ran")

    monkeypatch.setattr(lstm_mod, "lstm_sequence_ref", no_reference)
    calls = []
    real = LSTMProjFunction.apply
    monkeypatch.setattr(LSTMProjFunction, "apply", lambda *a: calls.append(1) or real(*a))
    ins, L, _ = make_case(4, 3, 5, 9, 4, F32, True, True, [4, 2, 1])
    x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, *ln = ins
    ours = lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(ln), L, backend="triton", w_hr=w_hr)
    assert calls == [1]
    monkeypatch.undo()
    ref = reference_fn([t.double() for t in ins], L)
    assert_close(ours, ref, tol(F32), OUT_NAMES)


def test_lstm_proj_ignores_the_output_gradient_past_a_sequence_end():
    """The output is 0 past a sequence's end whatever the weights, so the gradient there must
    reach nothing (as in the reference, where torch.where stops it): NaN in dout at those steps
    leaves every gradient finite and equal to the one with zeros there."""
    lengths = [5, 2, 0]
    ins, L, (dout, dh_n, dc_n) = make_case(5, 3, 4, 9, 4, F64, False, True, lengths)
    pad = torch.arange(5, device=DEV).unsqueeze(1) >= L.unsqueeze(0)
    _, clean = fwd_bwd(kernels_fn(), ins, L, (dout.masked_fill(pad.unsqueeze(-1), 0.0), dh_n, dc_n))
    _, poisoned = fwd_bwd(kernels_fn(), ins, L, (dout.masked_fill(pad.unsqueeze(-1), float("nan")), dh_n, dc_n))
    for a, b, n in zip(poisoned, clean, NAMES):
        assert torch.equal(a, b), n


def test_lstm_proj_second_backward_is_identical():
    """The backward reads its saved tensors and writes none: retain_graph=True gives the same
    gradients twice, bit for bit."""
    ins, L, ups = make_case(4, 3, 5, 9, 4, F32, False, True, [4, 2, 1])
    leaves = [t.detach().requires_grad_() for t in ins]
    outs = kernels_fn()(leaves, L)
    loss = sum((o * u).sum() for o, u in zip(outs, ups))
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves)
    for a, b, n in zip(first, second, NAMES):
        assert torch.equal(a, b), n


def test_lstm_proj_persistent_request_warns_and_runs_step(monkeypatch):
    """No persistent kernel takes the projection: asking for one says so once and runs the steps."""
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    ins, L, ups = make_case(3, 2, 4, 6, 3, F64, False, True, None)
    with pytest.warns(RuntimeWarning, match="persistent path not possible for lstm_proj_fwd"):
        outs, grads = fwd_bwd(kernels_fn("persistent"), ins, L, ups)
    r_outs, r_grads = fwd_bwd(reference_fn, ins, L, ups)
    assert_close(outs, r_outs, tol(F64), OUT_NAMES)
    assert_close(grads, r_grads, tol(F64), NAMES)


@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_NAME.get)
def test_lstm_proj_custom_ops_opcheck(dtype, ln):
    """opcheck: schemas, fake implementations (every output's shape and dtype), aot_dispatch."""
    ins, L, ups = make_case(2, 3, 4, 5, 2, dtype, ln, True, [2, 1, 0])
    x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, *lnp = ins
    lnp = lnp or [None] * 4
    args = (x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, *lnp, L, config.LN_EPS, False)
    torch.library.opcheck(torch.ops.fused_rnn.lstm_proj_fwd.default, args)
    h_n, c_n, hp, hs, cs, gates = torch.ops.fused_rnn.lstm_proj_fwd(*args)
    bargs = (*ups, x, w_ih, w_hh, w_hr, hp, hs, cs, gates, b_ih, b_hh, *lnp, L, config.LN_EPS, False, True, True)
    torch.library.opcheck(torch.ops.fused_rnn.lstm_proj_bwd.default, bargs)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
def test_lstm_proj_graph_path_matches_step(ln):
    """The graph path replays the step launcher: the same results (cuBLAS may pick another
    algorithm under capture, hence the small tolerance), on repeated calls too."""
    _paths.clear_graphs()
    for seed in range(2):
        ins, L, ups = make_case(9, 20, 16, 64, 24, BF16, ln, True, [9 - b % 3 for b in range(20)], seed=seed)
        g_outs, g_grads = fwd_bwd(kernels_fn("graph"), ins, L, ups)
        s_outs, s_grads = fwd_bwd(kernels_fn("step"), ins, L, ups)
        for a, b in zip(g_outs + g_grads, s_outs + s_grads):
            assert not torch.isnan(a).any()
            assert torch.equal(a, b) or rel_err(a, b) <= 1e-3
    assert len(_paths._graphs) == 2 and all(g is not None for g in _paths._graphs.values())
