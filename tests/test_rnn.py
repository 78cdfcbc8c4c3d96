"""Elman RNN kernels (tanh and ReLU; fused_rnn.kernels.rnn through fused_rnn.rnn.RNNFunction)
against the reference path, as tests/test_lstm.py tests the LSTM's: on a CUDA GPU or under
TRITON_INTERPRET=1, launcher buffers NaN-poisoned, errors relative to an fp64 reference."""
import warnings
from collections import OrderedDict

import pytest
import torch

from conftest import (
    BF16, DT_NAME, F16, F32, F64, assert_close, assert_deterministic, assert_matches_reference, force_step_tile,
    fwd_bwd, kernel_device, rel_err, requires_kernels, STEP_SHAPES, tol,
)
from fused_rnn import _backend
from fused_rnn.reference import rnn_sequence_ref
from fused_rnn.rnn import RNNFunction, rnn_sequence

pytestmark = [requires_kernels, pytest.mark.usefixtures("poison")]
DEV = kernel_device()


def make_case(T, B, I, H, dtype, bias=True, lengths=None, seed=0):
    """Inputs [x, h0, w_ih, w_hh, b_ih, b_hh] in ``dtype`` on DEV, lengths, upstream (dout, dh_n)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(device=DEV, dtype=dtype)

    k = 1.5 / H ** 0.5
    ins = [r(T, B, I), r(B, H), r(H, I, scale=k), r(H, H, scale=k)]
    ins += [r(H, scale=k), r(H, scale=k)] if bias else [None, None]
    L = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=DEV)
    return ins, L, (r(T, B, H), r(B, H))


def triton_rnn(nonlinearity, fused=True):
    def fn(ins, L):
        return RNNFunction.apply(*ins, L, nonlinearity, False, fused)

    return fn


def reference_rnn(nonlinearity):
    def fn(ins, L):
        return rnn_sequence_ref(*ins, L, nonlinearity)

    return fn


NAMES = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
OUT_NAMES = ["out", "h_n"]

SHAPES = list(STEP_SHAPES)  # (id, T, B, I, H, lengths, bias)
if DEV is not None and DEV.type == "cuda":
    SHAPES += [("B64-T33-H200", 33, 64, 48, 200, None, True), ("B20-T9-H300-len", 9, 20, 16, 300,
                                                                [9 - b % 5 for b in range(20)], True),
               ("B192-T6-H384-len", 6, 192, 32, 384, [6 - b % 4 for b in range(192)], True)]  # 64-row tiles
    DTYPES = [F64, F32, F16, BF16]
else:
    DTYPES = [F64, F32]


def _cases():
    for sid, T, B, I, H, lengths, bias in SHAPES:
        for dtype in DTYPES:
            for nl in ("tanh", "relu"):
                for fused in (True, False):
                    yield pytest.param(T, B, I, H, lengths, bias, dtype, nl, fused,
                                       id=f"{sid}-{DT_NAME[dtype]}-{nl}-{'fused' if fused else 'unfused'}")
    if DEV is not None and DEV.type == "cpu":  # half precisions through the interpreter: one shape
        for dtype in (F16, BF16):
            for fused in (True, False):
                yield pytest.param(5, 3, 5, 37, [5, 2, 0], True, dtype, "tanh", fused,
                                   id=f"B3-T5-H37-len-{DT_NAME[dtype]}-tanh-{'fused' if fused else 'unfused'}")


@pytest.mark.parametrize("T,B,I,H,lengths,bias,dtype,nl,fused", list(_cases()))
def test_rnn_matches_reference(T, B, I, H, lengths, bias, dtype, nl, fused):
    ins, L, ups = make_case(T, B, I, H, dtype, bias, lengths)
    assert_matches_reference(triton_rnn(nl, fused), reference_rnn(nl), ins, L, ups, NAMES, OUT_NAMES)


@pytest.mark.parametrize("nl", ["tanh", "relu"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_rnn_gradcheck(nl, fused):
    """fp64 gradcheck of the hand-written backward for every input, weight, bias and the initial
    state, with variable lengths (a finished sequence, so the pass-through is covered)."""
    ins, L, _ = make_case(3, 2, 3, 5, F64, True, [3, 1])
    fn = triton_rnn(nl, fused)
    leaves = [t.detach().requires_grad_() for t in ins]
    assert torch.autograd.gradcheck(lambda *a: fn(list(a), L), leaves)


@pytest.mark.parametrize("BB,BH,nw", [pytest.param(64, 16, 8, id="64x16"), pytest.param(64, 32, 8, id="64x32"),
                                       pytest.param(16, 32, 4, id="16x32")])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_NAME.get)
def test_rnn_step_tiles(dtype, BB, BH, nw, monkeypatch):
    """The fused step kernels at the other tiles the launchers take (64 rows at a large batch:
    S3; 32 units), forced through options().step_tiles at B70 H20 (partial row and unit blocks),
    against the reference; and the rule that picks them (kernels.tiles.rnn_blocks)."""
    from fused_rnn.kernels import rnn as K
    from fused_rnn.kernels.tiles import rnn_blocks

    assert rnn_blocks(256, 1024, "fwd", True, BF16) == (64, 32, 64, 8)
    assert rnn_blocks(64, 512, "fwd", True, BF16) == (16, 32, 64, 4)
    assert rnn_blocks(16, 256, "bwd", True, BF16) == (16, 16, 64, 4)
    T, B, H = 3, 70, 20
    ins, L, ups = make_case(T, B, 6, H, dtype, True, [3 - b % 4 for b in range(B)])
    with force_step_tile(monkeypatch, K, BLOCK_B=BB, BLOCK_H=BH, num_warps=nw) as tiles:
        outs, grads = fwd_bwd(triton_rnn("tanh"), ins, L, ups)
    assert len(tiles) == 2 and all(t[:2] == (BB, BH) for t in tiles), tiles  # both launches took it
    r_outs, r_grads = fwd_bwd(reference_rnn("tanh"), ins, L, ups, dtype=F64)
    for a, b in zip(outs + grads, r_outs + r_grads):
        assert not torch.isnan(a).any()
        assert rel_err(a, b) <= tol(dtype)


def test_rnn_sequence_dispatch():
    """rnn_sequence(backend="triton") takes the kernel path and matches."""
    ins, L, _ = make_case(4, 3, 5, 9, F32, True, [4, 2, 1])
    ours = rnn_sequence(*ins, L, "relu", backend="triton")
    ref = rnn_sequence_ref(*[t.double() for t in ins], L, "relu")
    assert_close(ours, ref, tol(F32), OUT_NAMES)


def test_rnn_deterministic():
    """Two identical calls: bitwise-identical outputs and gradients."""
    ins, L, ups = make_case(3, 17, 4, 20, F32, True, [3, 1, 2] * 5 + [0, 3])
    assert_deterministic(triton_rnn("tanh"), ins, L, ups)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("nl", ["tanh", "relu"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_rnn_nonfinite_propagates(nl, bad):
    """A NaN or inf in x propagates exactly as in the reference, forward and backward."""
    ins, L, ups = make_case(4, 3, 5, 9, F32, True, None)
    ins[0][1, 1, 2] = float(bad)
    outs, grads = fwd_bwd(triton_rnn(nl), ins, L, ups)
    r_outs, r_grads = fwd_bwd(reference_rnn(nl), ins, L, ups)
    for a, b, n in zip(outs, r_outs, OUT_NAMES):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), n
        assert torch.equal(torch.isinf(a), torch.isinf(b)), n
        fin = torch.isfinite(b)
        assert rel_err(a[fin], b[fin]) <= 1e-5, n
    for g, rg, n in zip(grads, r_grads, NAMES):
        assert torch.equal(torch.isnan(g), torch.isnan(rg)), n


def test_rnn_empty_sequence_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    ins, _, _ = make_case(1, 2, 3, 5, F32)
    x, h0, *w = ins
    with pytest.warns(RuntimeWarning, match="empty"):
        out, h_n = rnn_sequence(x[:0], h0, *w, None, "tanh", backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnn_sequence(x[:0], h0, *w, None, "tanh", backend="triton")
    assert out.shape == (0, 2, 5) and torch.equal(h_n, h0)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_NAME.get)
def test_rnn_custom_ops_opcheck(dtype):
    """opcheck: the custom ops' schemas, fake implementations, registrations and aot_dispatch."""
    ins, L, ups = make_case(2, 3, 4, 5, dtype, True, [2, 1, 0])
    args = (*ins, L, "tanh", False, True)
    torch.library.opcheck(torch.ops.fused_rnn.rnn_fwd.default, args)
    out, h_n, hs = torch.ops.fused_rnn.rnn_fwd(*args)
    x, h0, w_ih, w_hh = ins[:4]
    bargs = (*ups, x, w_ih, w_hh, hs, L, "tanh", False, True, True, True)
    torch.library.opcheck(torch.ops.fused_rnn.rnn_bwd.default, bargs)
