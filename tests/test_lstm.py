"""LSTM and layer-norm LSTM kernels (fused_rnn.kernels.lstm through fused_rnn.lstm.LSTMFunction)
against the reference path.

Runs where the kernels can run: a CUDA GPU, or the CPU under TRITON_INTERPRET=1 (tiny shapes:
the interpreter is slow). Every launcher buffer a kernel must fill is NaN-poisoned
(options().poison), so an element a kernel leaves unwritten fails the comparison.
Tolerances are relative to an fp64 reference, ‖ours − ref‖ / ‖ref‖.
"""
import warnings
from collections import OrderedDict

import pytest
import torch

from conftest import (
    BF16, DT_NAME, F16, F32, F64, HAS_CUDA, assert_close, assert_deterministic, assert_matches_reference,
    force_step_tile, fwd_bwd, kernel_device, rel_err, requires_kernels, STEP_SHAPES, tol,
)
from fused_rnn import _backend
from fused_rnn.lstm import LSTMFunction, lstm_sequence
from fused_rnn.kernels import config
from fused_rnn.reference import lstm_sequence_ref

pytestmark = [requires_kernels, pytest.mark.usefixtures("poison")]
DEV = kernel_device()


def make_case(T, B, I, H, dtype, ln, bias=True, lengths=None, seed=0):
    """Inputs as a list [x, h0, c0, w_ih, w_hh, b_ih, b_hh, (gw, gb, cw, cb)] in ``dtype`` on DEV,
    lengths (int64 on DEV or None), and the upstream gradients (dout, dh_n, dc_n)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(device=DEV, dtype=dtype)

    k = 2.0 / H ** 0.5  # a bit wider than nn.LSTM's init so the gates leave the linear range
    ins = [r(T, B, I), r(B, H), r(B, H), r(4 * H, I, scale=k), r(4 * H, H, scale=k)]
    ins += [r(4 * H, scale=k), r(4 * H, scale=k)] if bias else [None, None]
    if ln:
        ins += [r(4 * H, scale=0.2, shift=1.0), r(4 * H, scale=0.2), r(H, scale=0.2, shift=1.0), r(H, scale=0.2)]
    L = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=DEV)
    ups = (r(T, B, H), r(B, H), r(B, H))
    return ins, L, ups


def triton_lstm(fused=None, save_gates=True):
    """fn(ins, lengths) -> (out, h_n, c_n) through LSTMFunction with a chosen kernel variant."""
    def fn(ins, L):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln = ins
        f = config.default_fused(w_hh.shape[1], ln or None, x.dtype) if fused is None else fused
        lnp = ln if ln else [None] * 4
        return LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *lnp, L, config.LN_EPS, False, f, save_gates)

    return fn


def reference_lstm(ins, L):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln = ins
    return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(ln) if ln else None, L)


NAMES = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "ln_gw", "ln_gb", "ln_cw", "ln_cb"]
OUT_NAMES = ["out", "h_n", "c_n"]

SHAPES = list(STEP_SHAPES)  # (id, T, B, I, H, lengths, bias)
if DEV is not None and DEV.type == "cuda":
    # H 100: the fused layer-norm kernel's widest tile (128 units); B192 H384: 64-row tiles
    # (kernels.tiles.step_tile: the plain LSTM in 16 bits, 64 x 16)
    SHAPES += [("B64-T33-H200-len", 33, 64, 48, 200, [33 - b % 7 for b in range(64)], True),
               ("B20-T9-H100", 9, 20, 16, 100, None, True),
               ("B192-T6-H384-len", 6, 192, 32, 384, [6 - b % 4 for b in range(192)], True)]
    DTYPES = [F64, F32, F16, BF16]
else:
    DTYPES = [F64, F32]


def _ln_fused_max_h(dtype):
    if DEV is None:  # no kernels here (maybe no Triton either): the tests are skipped anyway
        return 1 << 30
    return config.ln_fused_max_h(dtype)


def _cases():
    for sid, T, B, I, H, lengths, bias in SHAPES:
        for dtype in DTYPES:
            for cell in ("lstm", "lnlstm"):
                for fused in (True, False):
                    if fused and cell == "lnlstm" and H > _ln_fused_max_h(dtype):
                        continue  # above the fused LN limit the layers use the unfused kernels
                    yield pytest.param(T, B, I, H, lengths, bias, dtype, cell, fused,
                                       id=f"{sid}-{DT_NAME[dtype]}-{cell}-{'fused' if fused else 'unfused'}")
    if DEV is not None and DEV.type == "cpu":  # half precisions through the interpreter: one shape
        for dtype in (F16, BF16):
            for cell in ("lstm", "lnlstm"):
                for fused in (True, False):
                    yield pytest.param(5, 3, 5, 37, [5, 2, 0], True, dtype, cell, fused,
                                       id=f"B3-T5-H37-len-{DT_NAME[dtype]}-{cell}-{'fused' if fused else 'unfused'}")


@pytest.mark.parametrize("T,B,I,H,lengths,bias,dtype,cell,fused", list(_cases()))
def test_lstm_matches_reference(T, B, I, H, lengths, bias, dtype, cell, fused):
    ins, L, ups = make_case(T, B, I, H, dtype, cell == "lnlstm", bias, lengths)
    assert_matches_reference(triton_lstm(fused), reference_lstm, ins, L, ups, NAMES, OUT_NAMES)


@pytest.mark.parametrize("cell", ["lstm", "lnlstm"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_lstm_gradcheck(cell, fused):
    """fp64 gradcheck of the hand-written backward for every input, weight, bias, initial state and
    LN parameter, with variable lengths (a finished sequence, so the pass-through is covered).
    Tiny shape: a full gradcheck runs the forward twice per input element, ~15-35 s through the
    interpreter, so there the unfused variants (whose kernels the reference comparison above also
    checks in fp64) run gradcheck's fast mode (a random projection per input)."""
    ins, L, _ = make_case(2, 2, 2, 3, F64, cell == "lnlstm", True, [2, 1])
    fn = triton_lstm(fused)
    leaves = [t.detach().requires_grad_() for t in ins]
    fast = not fused and DEV.type == "cpu"
    assert torch.autograd.gradcheck(lambda *a: fn(list(a), L), leaves, fast_mode=fast)


def test_lstm_sequence_dispatch():
    """lstm_sequence(backend="triton") takes the kernel path (default variant) and matches."""
    ins, L, _ = make_case(4, 3, 5, 9, F32, True, True, [4, 2, 1])
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln = ins
    ours = lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(ln), L, backend="triton")
    ref = reference_lstm([t.double() for t in ins], L)
    assert_close(ours, ref, tol(F32), OUT_NAMES)


def test_lstm_ln_above_fused_limit_runs_unfused(monkeypatch):
    """Above LN_FUSED_MAX_H (lowered here) the LN-LSTM takes the unfused kernels, same results."""
    monkeypatch.setattr(config, "LN_FUSED_MAX_H", 8)
    ins, L, _ = make_case(3, 3, 5, 9, F32, True, True, [3, 1, 2])
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln = ins
    assert not config.default_fused(9, tuple(ln), F32)
    ours = lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(ln), L, backend="triton")
    ref = reference_lstm([t.double() for t in ins], L)
    assert_close(ours, ref, tol(F32), OUT_NAMES)


# the fused step kernels' tiles (kernels.tiles.step_tile) besides the 16 x 16 that small shapes take
STEP_TILES = [pytest.param(64, 16, 8, id="64x16"), pytest.param(64, 32, 8, id="64x32"),
              pytest.param(16, 32, 4, id="16x32")]


@pytest.mark.parametrize("BB,BH,nw", STEP_TILES)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_NAME.get)
def test_lstm_step_tiles(dtype, BB, BH, nw, monkeypatch):
    """The fused step kernels at the other tiles the launchers take (64 rows at a large batch,
    32 units where the estimate prefers them), forced through options().step_tiles at
    B70 H20 (a partial row block: 6 rows and 58 masked ones with 64-row blocks; partial unit
    blocks); forward and backward against the reference."""
    from fused_rnn.kernels import lstm as K

    T, B, H = 3, 70, 20
    ins, L, ups = make_case(T, B, 6, H, dtype, False, True, [3 - b % 4 for b in range(B)])
    with force_step_tile(monkeypatch, K, BLOCK_B=BB, BLOCK_H=BH, num_warps=nw) as tiles:
        outs, grads = fwd_bwd(triton_lstm(True), ins, L, ups)
    assert len(tiles) == 2 and all(t[:2] == (BB, BH) for t in tiles), tiles  # both launches took it
    r_outs, r_grads = fwd_bwd(reference_lstm, ins, L, ups, dtype=F64)
    assert_close(outs, r_outs, tol(dtype), OUT_NAMES)
    assert_close(grads, r_grads, tol(dtype), NAMES)


def test_step_blocks_rule():
    """kernels.tiles.lstm_blocks: the fused plain LSTM's tile where step_tile's estimate puts it
    (S3 in bf16: 64 x 32; S1, S4: 16 x 16; S2: 64 x 16 forward, 16 x 32 backward; never 64 rows
    below B64); the layer-norm tiles keep whole rows; options().step_tiles replaces what it names."""
    from fused_rnn.kernels import config
    from fused_rnn.kernels.tiles import lstm_blocks, step_time_us

    assert lstm_blocks(256, 1024, "fwd", True, False, BF16) == (64, 32, 32, 8)
    assert lstm_blocks(256, 1024, "bwd", True, False, BF16) == (64, 32, 64, 8)
    for B, H in ((16, 256), (16, 768)):
        assert lstm_blocks(B, H, "fwd", True, False, BF16) == (16, 16, 32, 4)
        assert lstm_blocks(B, H, "bwd", True, False, BF16) == (16, 16, 64, 4)
    assert lstm_blocks(64, 512, "fwd", True, False, BF16) == (64, 16, 32, 8)
    assert lstm_blocks(64, 512, "bwd", True, False, BF16) == (16, 32, 64, 4)
    assert lstm_blocks(63, 4096, "fwd", True, False, BF16)[0] == 16
    assert lstm_blocks(16, 256, "fwd", True, False, F32)[2:] == (32, 4)  # BLOCK_K 64 spilled
    assert lstm_blocks(16, 128, "fwd", True, True, F32) == (16, 128, 16, 16)
    assert lstm_blocks(16, 100, "bwd", True, True, BF16) == (16, 128, 16, 8)
    assert lstm_blocks(16, 256, "bwd", False, True, BF16) == (4, 256, 16, 8)
    assert lstm_blocks(3, 2048, "bwd", False, True, BF16) == (1, 2048, 16, 8)
    assert not config.default_fused(256, (), BF16) and config.default_fused(128, (), BF16)
    # the estimate behind the choice (kernels/tiles.py): S3's bf16 forward step
    t16 = step_time_us(256, 1024, 1024, 4, 16, 32, 2, 2, 132)
    t64 = step_time_us(256, 1024, 1024, 4, 64, 32, 2, 2, 132)
    assert 25 < t16 < 30 and 8 < t64 < 10
    with config.using(step_tiles={"BLOCK_K": 16}):
        assert lstm_blocks(256, 1024, "fwd", True, False, BF16) == (64, 32, 16, 8)
    assert lstm_blocks(256, 1024, "fwd", True, False, BF16) == (64, 32, 32, 8)


@pytest.mark.parametrize("cell", ["lstm", "lnlstm"])
def test_lstm_recompute_gates(cell):
    """save_gates=False (gates recomputed by one GEMM in backward) gives the same gradients."""
    ins, L, ups = make_case(4, 3, 5, 11, F64, cell == "lnlstm", True, [4, 0, 2])
    saved = fwd_bwd(triton_lstm(True, save_gates=True), ins, L, ups)
    recomputed = fwd_bwd(triton_lstm(True, save_gates=False), ins, L, ups)
    for a, b in zip(saved[0] + saved[1], recomputed[0] + recomputed[1]):
        assert rel_err(b, a) < 1e-12


@pytest.mark.parametrize("path", ["step", "persistent"])
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_NAME.get)
def test_lstm_backward_writes_dG_over_saved_gates(dtype, ln, path, monkeypatch):
    """The first eager backward writes dG over the saved gates buffer (no [T+1, B, 4H] dG
    allocated) where the dtypes agree (plain LSTM; LN-LSTM in fp32), with the gradients of the
    op that leaves the gates alone, bit for bit. A second and a third backward of the same graph
    (retain_graph) run the forward again for the gates and return the same gradients, bit for
    bit (backward reentrant, as gradcheck demands)."""
    from fused_rnn import _paths
    from fused_rnn import lstm as ops
    from fused_rnn.kernels import lstm as K

    T, B, I, H = 5, 3, 4, 6
    ins, L, ups = make_case(T, B, I, H, dtype, ln, True, [5, 2, 0])
    leaves = [t.detach().requires_grad_() for t in ins]
    real_alloc = K.alloc
    dG_allocs = []

    def spy_alloc(shape, dt, device):
        if tuple(shape) == (T + 1, B, 4 * H):
            dG_allocs.append(dt)
        return real_alloc(shape, dt, device)

    consumed, forwards = [], []
    real_consuming, real_fwd = ops.lstm_bwd_consuming, K.lstm_fwd

    def spy_consuming(*a):
        consumed.append(a[8].numel() > 0)  # gates passed (True) or to be recomputed (False)
        return real_consuming(*a)

    def spy_fwd(*a, **k):
        forwards.append(k.get("save_gates"))
        return real_fwd(*a, **k)

    monkeypatch.setattr(ops, "lstm_bwd_consuming", spy_consuming)
    monkeypatch.setattr(K, "lstm_fwd", spy_fwd)
    with _paths.use_path(path):
        outs = triton_lstm(True)(leaves, L)
        loss = sum((o.float() * u.float()).sum() for o, u in zip(outs, ups))
        monkeypatch.setattr(K, "alloc", spy_alloc)
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        in_place = not (ln and dtype == BF16)  # LN-LSTM gates fp32, dG bf16: no aliasing
        assert dG_allocs == ([] if in_place else [dtype]), dG_allocs
        second = torch.autograd.grad(loss, leaves, retain_graph=True)
        third = torch.autograd.grad(loss, leaves)
    assert consumed == [True, True, True] and forwards == [True] * 3  # 1 forward, 2 re-runs
    # the op (gates left alone) on a fresh forward: identical to the first backward
    monkeypatch.setattr(ops, "lstm_bwd_consuming", lambda *a: torch.ops.fused_rnn.lstm_bwd(*a))
    ref_like = [t.detach().requires_grad_() for t in ins]
    with _paths.use_path(path):
        outs2 = triton_lstm(True)(ref_like, L)
        loss2 = sum((o.float() * u.float()).sum() for o, u in zip(outs2, ups))
        op_grads = torch.autograd.grad(loss2, ref_like)
    for a, b, n in zip(first, op_grads, NAMES):
        assert torch.equal(a, b), f"{n}: consuming backward differs from the op's"
    ref = fwd_bwd(reference_lstm, ins, L, ups, dtype=F64)[1]
    assert_close(list(first), ref, tol(dtype), NAMES)
    for again in (second, third):
        for a, b, n in zip(first, again, NAMES):
            assert torch.equal(a, b), f"{n}: a later backward of the same graph differs from the first"


def test_lstm_output_is_the_saved_h_sequence():
    """LSTMFunction's output is a view of the h sequence it saves for backward (no copy), and an
    in-place change of it is refused, never a silently wrong gradient (lstm_sequence hands out a
    copy where autograd records the output, so that in-place ops work as on nn.LSTM's:
    tests/test_torch_api.py)."""
    ins, L, ups = make_case(4, 3, 5, 6, F32, False, True, [4, 2, 0])
    leaves = [t.detach().requires_grad_() for t in ins]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, h_n, c_n = triton_lstm(True)(leaves, L)
    assert any(t.dim() == 3 and t.shape[0] == 5 and t[1:].data_ptr() == out.data_ptr() for t in saved)
    assert (out[2:, 1] == 0).all() and (out[:, 2] == 0).all()  # past each sequence's end
    ref = reference_lstm([t.detach().double() for t in ins], L)
    assert rel_err(h_n, ref[1]) < 1e-5 and rel_err(c_n, ref[2]) < 1e-5  # h_n from each row's last step
    with pytest.raises(RuntimeError):
        out.mul_(2)


def test_lstm_deterministic():
    """Two identical calls: bitwise-identical outputs and gradients (LN partial sums over two row
    blocks included)."""
    ins, L, ups = make_case(3, 17, 4, 20, F32, True, True, [3, 1, 2] * 5 + [0, 3])
    assert_deterministic(triton_lstm(True), ins, L, ups)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("cell", ["lstm", "lnlstm"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_lstm_nonfinite_propagates(cell, bad):
    """A NaN or inf in x propagates to the same outputs as in the reference; backward runs."""
    ins, L, ups = make_case(4, 3, 5, 9, F32, cell == "lnlstm", True, None)
    ins[0][1, 1, 2] = float(bad)
    outs, grads = fwd_bwd(triton_lstm(True), ins, L, ups)
    r_outs, r_grads = fwd_bwd(reference_lstm, ins, L, ups)
    for a, b, n in zip(outs, r_outs, OUT_NAMES):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), n
        assert torch.equal(torch.isinf(a), torch.isinf(b)), n
        fin = torch.isfinite(b)
        assert rel_err(a[fin], b[fin]) <= 1e-5, n
    assert not torch.isnan(outs[0][0]).any()  # steps before the bad one are untouched
    for g, rg, n in zip(grads, r_grads, NAMES):
        assert torch.equal(torch.isnan(g), torch.isnan(rg)), n


def test_lstm_fallback_warns_once(monkeypatch):
    """A size the kernels cannot take (LN with H above the limit, lowered here) runs the reference
    with one warning, never an error."""
    monkeypatch.setattr(config, "LN_MAX_H", 8)
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    ins, L, _ = make_case(3, 2, 3, 9, F32, True, True, None)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln = ins
    with pytest.warns(RuntimeWarning, match="reference"):
        ours = lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(ln), L, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(ln), L, backend="triton")
    ref = lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(ln), L)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_lstm_empty_sequence_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    ins, _, _ = make_case(1, 2, 3, 5, F32, False)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
    with pytest.warns(RuntimeWarning, match="empty"):
        out, h_n, c_n = lstm_sequence(x[:0], h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, backend="triton")
    assert out.shape == (0, 2, 5) and torch.equal(h_n, h0) and torch.equal(c_n, c0)


@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_NAME.get)
def test_lstm_custom_ops_opcheck(dtype, ln):
    """opcheck: the custom ops' schemas, fake implementations (shapes and dtypes of every output,
    16-bit buffers included), registrations and aot_dispatch."""
    ins, L, ups = make_case(2, 3, 4, 5, dtype, ln, True, [2, 1, 0])
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, *lnp = ins
    lnp = lnp or [None] * 4
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, *lnp, L, config.LN_EPS, False, True, True)
    torch.library.opcheck(torch.ops.fused_rnn.lstm_fwd.default, args)
    h_n, c_n, hs, cs, gates = torch.ops.fused_rnn.lstm_fwd(*args)
    bargs = (*ups, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, *lnp, L, config.LN_EPS, False, True, True, True)
    torch.library.opcheck(torch.ops.fused_rnn.lstm_bwd.default, bargs)


@pytest.mark.parametrize("ln", [False, True], ids=["plain", "ln"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=DT_NAME.get)
def test_lstm_buffer_dtypes(dtype, ln, monkeypatch):
    """kernels.config's buffer dtypes: h_t, the plain LSTM's gates, saved c and dG in 16 bits for 16-bit
    inputs (the gates written over the input projection), the LN-LSTM's gates and c in fp32."""
    from fused_rnn.kernels import lstm as K

    half = dtype in (F16, BF16)
    ins, L, ups = make_case(3, 2, 4, 5, dtype, ln, True, None)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, *lnp = ins
    out, h_n, c_n, hs, cs, gates = K.lstm_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lnp or None)
    assert hs.dtype == dtype
    assert cs.dtype == (F32 if ln or not half else dtype)
    assert gates.dtype == (F32 if ln or not half else dtype)
    # the output is hs[1:] itself: the saved h_t cost no buffer of their own
    assert out.data_ptr() == hs[1].data_ptr() and out.dtype == hs.dtype == dtype
    seen = {}
    real_alloc = K.alloc

    def spy_alloc(shape, dt, device):
        buf = real_alloc(shape, dt, device)
        seen.setdefault(tuple(shape), []).append(dt)
        return buf

    monkeypatch.setattr(K, "alloc", spy_alloc)
    K.lstm_bwd(*ups, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, lnp or None)
    assert seen[(4, 2, 20)] == [dtype if half else F32]  # dG [T+1, B, 4H]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_lstm_fp32_tf32_switch(allow_tf32, monkeypatch):
    """fp32 matmuls follow torch.backends.cuda.matmul.allow_tf32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    ins, L, ups = make_case(16, 32, 64, 128, F32, False, True, None)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
    ours = lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, backend="triton")
    ref = reference_lstm([t.double() for t in ins], None)
    assert_close(ours, ref, 5e-3 if allow_tf32 else 1e-4, OUT_NAMES)


def test_lstm_inference_does_not_store_gates(monkeypatch):
    """Under no_grad (or with nothing requiring grad) the forward stores no gates: nothing will
    read them. With grad it does (the default, options().save_gates)."""
    from fused_rnn.kernels import lstm as K

    seen = []
    real = K.lstm_fwd

    def spy(*a, **k):
        seen.append(k.get("save_gates"))
        return real(*a, **k)

    monkeypatch.setattr(K, "lstm_fwd", spy)
    ins, L, _ = make_case(3, 2, 4, 5, F32, False)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
    with torch.no_grad():
        out0 = lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, backend="triton")[0]
    lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, backend="triton")
    w = w_hh.detach().requires_grad_()
    out1 = lstm_sequence(x, h0, c0, w_ih, w, b_ih, b_hh, backend="triton")[0]
    assert seen == [False, False, True]
    assert torch.equal(out0, out1.detach())
