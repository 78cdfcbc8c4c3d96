"""Persistent layer-norm LSTM kernels (fused_rnn.kernels.ln_lstm_persistent: one launch for all T steps,
the LayerNorm statistics combined across programs through global memory between grid barriers).

Under the Triton interpreter (CPU) a grid's programs run one after another, so only one program
per row block can pass a barrier: plan_ln() gives one program covering all of H there, and these
tests compare that path with the step path (kernels.lstm with ln and no plan) and with an fp64
reference. The cross-program combine (Chan's formula over P > 1 partials, the plain sums of the
backward) is driven directly with P > 1 through small single-program test kernels: the only P > 1
logic CI runs. The multi-program kernels themselves run only in the CUDA tests at the end.
Buffers the kernels must fill are NaN-filled first, so an element left unwritten fails.
"""
import pytest
import torch

from _persistent_helpers import use_options  # noqa: F401 (fixtures)
from conftest import (
    BF16, DT_NAME, F32, F64, HAS_CUDA, INTERPRET, kernel_device, launch_plan, rel_err, requires_cuda,
    requires_kernels, tol,
)
from fused_rnn.kernels.config import LN_EPS, state_dtype, zero_padding
from fused_rnn.reference import lstm_cell_ref, lstm_sequence_ref


DEV = kernel_device()


NAN = float("nan")


def _mods():
    from fused_rnn.kernels import _common, ln_lstm_persistent as PL, lstm as KL, persistent as P, tiles

    return _common, KL, PL, P, tiles


def make_case(T, B, I, H, dtype, lengths=None, seed=0):
    """Inputs [x, h0, c0, w_ih, w_hh, b_ih, b_hh], LN params [gw, gb, cw, cb] in ``dtype`` on DEV,
    lengths, and upstream gradients (dout, dh_n, dc_n)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(device=DEV, dtype=dtype)

    k = 2.0 / H ** 0.5
    ins = [r(T, B, I), r(B, H), r(B, H), r(4 * H, I, scale=k), r(4 * H, H, scale=k), r(4 * H, scale=k),
           r(4 * H, scale=k)]
    ln = [r(4 * H, scale=0.2, shift=1.0), r(4 * H, scale=0.2), r(H, scale=0.2, shift=1.0), r(H, scale=0.2)]
    L = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=DEV)
    ups = [r(T, B, H), r(B, H), r(B, H)]
    return ins, ln, L, ups


def run_fwd(pl, x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, L, like=None, merge_c=None):
    """Our forward loop on freshly NaN-filled buffers; ``like``: the step path's (hs, cs, gates)
    whose dtypes to copy (so the test follows whatever dtypes kernels.lstm chose); ``merge_c``:
    the forward variant (None: the launcher's rule, tiles.fwd_merge_c)."""
    C, KL, PL, P, tiles = _mods()
    T, B, _ = x.shape
    G, H = w_hh.shape
    sd = state_dtype(x.dtype)
    hdt, cdt, gdt = (sd, sd, sd) if like is None else (like[0].dtype, like[1].dtype, like[2].dtype)
    xp = C.input_projection(x.contiguous(), w_ih.contiguous(), b_ih, b_hh, lengths=L)  # padding as 0, as lstm_fwd
    hs = torch.full((T + 1, B, H), NAN, dtype=hdt, device=x.device)
    cs = torch.full((T + 1, B, H), NAN, dtype=cdt, device=x.device)
    hs[0] = h0
    cs[0] = c0
    gates = torch.full((T + 1, B, G), NAN, dtype=gdt, device=x.device)  # kernels.lstm's layout:
    gates[T] = 0  # slot T spare and zero (the backward may write dG over the buffer)
    PL.ln_lstm_fwd_loop(pl, xp, w_hh.contiguous(), hs, cs, gates[:T], ln, L, LN_EPS,
                        *C.dot_flags(w_hh.dtype, False, x.device), merge_c=merge_c)
    return hs[1:], hs, cs, gates


def run_bwd(pl, ups, x, w_ih, w_hh, hs, cs, gates, ln, L, dg_dtype=None, merge_bwd=None):
    """Our reverse loop, then the after-loop gradients with plain torch (so that this test does not
    depend on kernels._common.after_loop_grads): (dx, dh0, dc0, dw_ih, dw_hh, db, dln, dG)."""
    C, KL, PL, P, tiles = _mods()
    dout, dh_n, dc_n = ups
    T, B, I = x.shape
    G, H = w_hh.shape
    sd = cs.dtype
    dG = torch.full((T + 1, B, G), NAN, dtype=dg_dtype or sd, device=x.device)
    dG[T] = 0
    gh = dh_n.to(sd, copy=True).contiguous()
    gc = dc_n.to(sd, copy=True).contiguous()
    dln = [torch.full((pl.row_blocks, n), NAN, dtype=sd, device=x.device) for n in (G, G, H, H)]
    PL.ln_lstm_bwd_loop(pl, gates[:T], w_hh.contiguous(), cs, dout.contiguous(), dG, gh, gc, ln, L, LN_EPS, dln,
                        *C.dot_flags(w_hh.dtype, False, x.device), merge_bwd=merge_bwd)
    d = dG[:T].to(sd).reshape(T * B, G)
    dh0 = dG[0].to(sd) @ w_hh.to(sd)
    if L is not None:
        dh0 = dh0 + torch.where((L > 0).unsqueeze(1), torch.zeros_like(gh), gh)
    dx = (d @ w_ih.to(sd)).view(T, B, I)
    dw_ih = d.t() @ x.reshape(T * B, I).to(sd)
    dw_hh = d.t() @ hs[:T].to(sd).reshape(T * B, H)
    db = d.sum(0)
    return dx, dh0, gc, dw_ih, dw_hh, db, [p.sum(0) for p in dln], dG


def reference(ins, ln, L, ups):
    """fp64 reference with the gate input x W_ihᵀ + b as a leaf, so that its gradient is dG:
    (out, h_n, c_n, hs, cs, gates) and the gradients w.r.t. (xp, h0, c0, w_hh, *ln)."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = [t.detach().to(F64) for t in ins]
    x = zero_padding(x, L)  # the padding projected as 0, as the launchers do
    ln = [p.detach().to(F64).requires_grad_() for p in ln]
    xp = (x @ w_ih.t() + b_ih + b_hh).detach().requires_grad_()
    h0 = h0.requires_grad_()
    c0 = c0.requires_grad_()
    w_hh = w_hh.requires_grad_()
    h, c = h0, c0
    outs, hs, cs, gates = [], [h0], [c0], []
    for t in range(x.shape[0]):
        # the matmul operand is hs[t], as in the kernels: h0, then the previous step's output
        # (0 past a row's end: the same gates on the valid steps, and known ones after the end)
        a = xp[t] + hs[-1] @ w_hh.t()
        gates.append(a)
        hn, cn = lstm_cell_ref(a, c, ln, LN_EPS)
        if L is None:
            h, c, o = hn, cn, hn
        else:
            m = (t < L).unsqueeze(1)
            h, c, o = torch.where(m, hn, h), torch.where(m, cn, c), torch.where(m, hn, torch.zeros_like(hn))
        outs.append(o)
        hs.append(o)
        cs.append(c)
    out = torch.stack(outs)
    loss = sum((a * u.to(F64)).sum() for a, u in zip((out, h, c), ups))
    grads = torch.autograd.grad(loss, [xp, h0, c0, w_hh, *ln])
    fwd = [out, h, c, torch.stack(hs), torch.stack(cs), torch.stack(gates)]
    return [t.detach() for t in fwd], list(grads)


def check(a, b, bound, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert not torch.isnan(a).any(), f"{what}: NaN (an unwritten element?)"
    e = rel_err(a, b)
    assert e <= bound, f"{what}: rel err {e:.3e} > {bound:.1e}"


# (T, B, I, H, lengths): H not a multiple of 16, B not a power of two, T = 1, a zero length, a full
# length and one past T, and B = 70: two row blocks of 64 (the interpreter runs one after another)
SHAPES = {
    "T5-B3-H37-len": (5, 3, 4, 37, [5, 2, 0]),
    "T3-B17-H20-len": (3, 17, 3, 20, [3, 1, 0, 3, 2, 4, 1, 3, 0, 2, 3, 3, 1, 2, 3, 1, 2]),
    "T1-B5-H16": (1, 5, 3, 16, None),
    "T2-B70-H5-len": (2, 70, 2, 5, [2, 1, 0] * 23 + [2]),
}


# vs the step path: the same math, only summation orders differ (the step path's statistics of the
# backward come from its kernel, ours from torch.var_mean)
CLOSE = {F64: 1e-12, F32: 2e-6, BF16: 1e-2}


def _cases():
    for sid in SHAPES:
        yield pytest.param(sid, F32, id=f"{sid}-fp32")
    yield pytest.param("T5-B3-H37-len", F64, id="T5-B3-H37-len-fp64")
    yield pytest.param("T1-B5-H16", F64, id="T1-B5-H16-fp64")
    yield pytest.param("T5-B3-H37-len", BF16, id="T5-B3-H37-len-bf16")
    yield pytest.param("T3-B17-H20-len", BF16, id="T3-B17-H20-len-bf16")


def _case_and_plans(sid, dtype):
    """The problem ``sid`` in ``dtype`` (ins, ln, L, ups) and its forward and backward LN plans."""
    tiles = _mods()[4]
    T, B, I, H, lengths = SHAPES[sid]
    ins, ln, L, ups = make_case(T, B, I, H, dtype, lengths)
    pf, why = tiles.plan_ln("fwd", B, H, dtype, DEV)
    pb, why_b = tiles.plan_ln("bwd", B, H, dtype, DEV)
    assert pf is not None and pb is not None, (why, why_b)
    return ins, ln, L, ups, pf, pb


@requires_kernels
@pytest.mark.parametrize("sid,dtype", list(_cases()))
def test_ln_persistent_matches_step_and_reference(sid, dtype):
    """Forward (out, hs, cs, gates) and backward (dG, dh0, dc0, weight and LN-parameter gradients)
    of the persistent LN loops against the step path and the fp64 reference."""
    C, KL, PL, P, tiles = _mods()
    T, B, I, H, lengths = SHAPES[sid]
    ins, ln, L, ups, pf, pb = _case_and_plans(sid, dtype)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
    if DEV.type == "cpu":
        assert pf.programs == 1 and pf.BLOCK_H >= H and pf.row_blocks == -(-B // pf.BLOCK_B)

    step = KL.lstm_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, L)  # the step path: out, h_n, c_n, hs, cs, gates
    out, hs, cs, gates = run_fwd(pf, *ins, ln, L, like=step[3:])
    ref_fwd, ref_grads = reference(ins, ln, L, ups)
    close = CLOSE[dtype]
    for name, a, b in (("out", out, step[0]), ("hs", hs, step[3]), ("cs", cs, step[4]), ("gates", gates, step[5])):
        check(a, b, close, f"fwd {name} vs step")
    for name, a, b in (("out", out, ref_fwd[0]), ("hs", hs, ref_fwd[3]), ("cs", cs, ref_fwd[4]),
                       ("gates", gates[:T], ref_fwd[5])):
        check(a, b, tol(dtype), f"fwd {name} vs reference")
    assert out.dtype == dtype
    if L is not None:  # zero output (hs[1:]) past a sequence's end, c held
        t_idx = torch.arange(T, device=DEV).unsqueeze(1)
        assert (out[t_idx >= L.unsqueeze(0)] == 0).all()
        ended = L == 0
        assert torch.equal(cs[T][ended], cs[0][ended])
    if dtype != BF16:
        # the reference's own sequence function agrees with the loop above (the test's oracle)
        ref_seq = lstm_sequence_ref(*[t.to(F64) for t in ins], tuple(p.to(F64) for p in ln), L)
        check(ref_fwd[0], ref_seq[0], 1e-13, "reference loop vs lstm_sequence_ref")

    dx, dh0, dc0, dw_ih, dw_hh, db, dln, dG = run_bwd(pb, ups, x, w_ih, w_hh, hs, cs, gates, ln, L)
    step_b = KL.lstm_bwd(*ups, x, w_ih, w_hh, step[3], step[4], step[5], b_ih, b_hh, ln, L)
    ours = [dx, dh0, dc0, dw_ih, dw_hh, db, *dln]
    theirs = [*step_b[:6], *step_b[6]]
    names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db", "dgw", "dgb", "dcw", "dcb"]
    for n, a, b in zip(names, ours, theirs):
        check(a, b.to(a.dtype), close, f"bwd {n} vs step")
    dxp, rdh0, rdc0, rdw_hh, *rdln = ref_grads
    check(dG[:T], dxp, tol(dtype), "dG vs reference")
    assert torch.equal(dG[T], torch.zeros_like(dG[T]))
    for n, a, b in (("dh0", dh0, rdh0), ("dc0", dc0, rdc0), ("dw_hh", dw_hh, rdw_hh), ("dgw", dln[0], rdln[0]),
                    ("dgb", dln[1], rdln[1]), ("dcw", dln[2], rdln[2]), ("dcb", dln[3], rdln[3])):
        check(a, b, tol(dtype), f"bwd {n} vs reference")
    if L is not None:  # no gradient flows into steps past a sequence's end
        t_idx = torch.arange(T, device=DEV).unsqueeze(1)
        assert (dG[:T][t_idx >= L.unsqueeze(0)] == 0).all()


@requires_kernels
def test_ln_persistent_16bit_state_buffers():
    """hs and dG in the storage dtype (bf16) instead of fp32: the kernels cast every load to the
    compute dtype (cs's / gc's) and every store to the destination's element type."""
    C, KL, PL, P, tiles = _mods()
    T, B, I, H, lengths = SHAPES["T5-B3-H37-len"]
    ins, ln, L, ups = make_case(T, B, I, H, BF16, lengths)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
    pf, _ = tiles.plan_ln("fwd", B, H, BF16, DEV)
    pb, _ = tiles.plan_ln("bwd", B, H, BF16, DEV)
    cs_like = torch.empty(0, dtype=F32)
    out, hs, cs, gates = run_fwd(pf, *ins, ln, L, like=(torch.empty(0, dtype=BF16), cs_like, cs_like))
    assert hs.dtype == BF16 and cs.dtype == F32
    ref_fwd, ref_grads = reference(ins, ln, L, ups)
    check(out, ref_fwd[0], tol(BF16), "out vs reference")
    check(hs, ref_fwd[3], tol(BF16), "hs (bf16) vs reference")
    dx, dh0, dc0, dw_ih, dw_hh, db, dln, dG = run_bwd(pb, ups, x, w_ih, w_hh, hs, cs, gates, ln, L, dg_dtype=BF16)
    assert dG.dtype == BF16
    check(dG[:T], ref_grads[0], tol(BF16), "dG (bf16) vs reference")
    for n, a, b in (("dh0", dh0, ref_grads[1]), ("dc0", dc0, ref_grads[2]), ("dgw", dln[0], ref_grads[4]),
                    ("dcb", dln[3], ref_grads[7])):
        check(a, b, tol(BF16), f"{n} vs reference")


def _count_barriers(monkeypatch):
    """Spy on the launchers' barrier counters: a list of (counter tensor, barriers per step, plan)
    per launch; after a launch counter r holds the arrivals at row block r's barriers."""
    _, _, PL, P, tiles = _mods()
    real = PL._ln_sync_counter
    seen = []

    def spy(T, pl, device, per_step=PL.BARRIERS_PER_STEP):
        sync = real(T, pl, device, per_step)
        seen.append((sync, per_step, pl))
        return sync

    monkeypatch.setattr(PL, "_ln_sync_counter", spy)
    return seen


# The forward's two variants: MERGE_C (2 grid barriers a step; every program rebuilds h_t from the
# published c_t and o_t rows) and 3 barriers. Lengths with a 0, a full one and one past T; H not a
# multiple of 16; B = 70 (two row blocks); fp32, fp64 (W_hh streamed on the CPU), bf16.
VARIANT_CASES = [("T5-B3-H37-len", F32), ("T5-B3-H37-len", F64), ("T5-B3-H37-len", BF16), ("T3-B17-H20-len", F64),
                 ("T3-B17-H20-len", BF16), ("T2-B70-H5-len", F32), ("T1-B5-H16", F64)]


@requires_kernels
@pytest.mark.parametrize("sid,dtype", VARIANT_CASES, ids=[f"{c[0]}-{DT_NAME[c[1]]}" for c in VARIANT_CASES])
def test_ln_persistent_fwd_variants(monkeypatch, sid, dtype):
    """Both forward variants against the step path, and against each other: with one program per
    row block (the interpreter) both take the c statistics with _ln_rows's operations (Chan's
    combine of one partial is that exactly) and the rebuilt matmul operand is what hs holds, so
    they agree bitwise; on a GPU (P > 1) to CLOSE. Each launch passes exactly its barriers."""
    C, KL, PL, P, tiles = _mods()
    T, B, I, H, lengths = SHAPES[sid]
    ins, ln, L, _ = make_case(T, B, I, H, dtype, lengths)
    pf, why = tiles.plan_ln("fwd", B, H, dtype, DEV)
    assert pf is not None, why
    assert tiles.fwd_merge_c(pf, H)  # the rule picks MERGE_C at these sizes
    step = KL.lstm_fwd(*ins, ln, L)
    seen = _count_barriers(monkeypatch)
    runs = {m: run_fwd(pf, *ins, ln, L, like=step[3:], merge_c=m) for m in (True, False)}
    assert [per_step for _, per_step, _ in seen] == [2, 3]
    for sync, per_step, pl in seen:
        assert sync.tolist() == [per_step * T * pl.programs] * pl.row_blocks
    names = ("out", "hs", "cs", "gates")
    for m, res in runs.items():
        for name, a, b in zip(names, res, (step[0], step[3], step[4], step[5])):
            check(a, b, CLOSE[dtype], f"merge_c={m}: fwd {name} vs step")
    for name, a, b in zip(names, runs[True], runs[False]):
        if DEV.type == "cpu":
            assert torch.equal(a, b), f"{name}: MERGE_C and 3 barriers differ"
        else:
            check(a, b, CLOSE[dtype], f"{name}: MERGE_C vs 3 barriers")
    if L is not None:  # past a row's end: the output hs[t+1] zero, c held (cs[t+1] = cs[t])
        out, hs, cs, _ = runs[True]
        ended = torch.arange(T, device=DEV).unsqueeze(1) >= L.unsqueeze(0)  # [T, B]
        assert (out[ended] == 0).all() and (hs[1:][ended] == 0).all()
        assert torch.equal(cs[1:][ended], cs[:-1][ended])


LL_CASES = [("T5-B3-H37-len", F32), ("T5-B3-H37-len", BF16), ("T2-B70-H5-len", F32), ("T3-B17-H20-len", BF16)]


@requires_kernels
@pytest.mark.skipif(HAS_CUDA, reason="the CUDA lane runs test_cuda_ll_exchange_ln_matches_barrier")
@pytest.mark.parametrize("sid,dtype", LL_CASES, ids=[f"{c[0]}-{DT_NAME[c[1]]}" for c in LL_CASES])
def test_ln_persistent_ll_exchange(monkeypatch, use_options, sid, dtype):
    """The LL exchange (Options.ll_sync: h_t / dG_t rows and the LayerNorm partials as tagged
    words, no barrier) against the 3-barrier variants, forward and backward: the same operations
    on the same operands, so equal bit for bit (one program per row block in the interpreter;
    several in tests/test_persistent_threads.py). The LL launches allocate no barrier counter."""
    _ln_ll_vs_barrier(monkeypatch, use_options, *SHAPES[sid], dtype)


# (T, B, I, H, lengths): S1's plans (LL both ways), S4's (the backward only: ln_ll_fits)
CUDA_LL_SHAPES = [(64, 16, 64, 256, None), (16, 16, 48, 768, "len")]


@requires_cuda
@pytest.mark.parametrize("shape", CUDA_LL_SHAPES, ids=[f"T{s[0]}-B{s[1]}-H{s[3]}" for s in CUDA_LL_SHAPES])
def test_cuda_ll_exchange_ln_matches_barrier(monkeypatch, use_options, shape):
    """The multi-program LN kernels with the LL exchange against the 3-barrier ones (bf16), to
    CLOSE (two compiled kernels); run by bench/gpu_check.sh's smoke_ll stage (an LL hang costs
    that stage only), left out of its pytest stage."""
    T, B, I, H, lengths = shape
    if lengths == "len":
        lengths = [T - (b % 5) for b in range(B)]
    _ln_ll_vs_barrier(monkeypatch, use_options, T, B, I, H, lengths, BF16)


def _ln_ll_vs_barrier(monkeypatch, use_options, T, B, I, H, lengths, dtype):
    C, KL, PL, P, tiles = _mods()

    ins, ln, L, ups = make_case(T, B, I, H, dtype, lengths)
    step = KL.lstm_fwd(*ins, ln, L)
    x, _, _, w_ih, w_hh = ins[:5]
    counters = []
    real_counter = PL._ln_sync_counter
    monkeypatch.setattr(PL, "_ln_sync_counter", lambda *a, **k: counters.append(a) or real_counter(*a, **k))
    runs, plans = {}, {}
    for ll in (False, True):
        use_options(ll_sync=ll)
        pf, why = tiles.plan_ln("fwd", B, H, dtype, DEV)
        pb, why_b = tiles.plan_ln("bwd", B, H, dtype, DEV)
        assert pf is not None and pb is not None, (why, why_b)
        plans[ll] = (pf, pb)
        counters.clear()
        f = run_fwd(pf, *ins, ln, L, like=step[3:], merge_c=False)
        b = run_bwd(pb, ups, x, w_ih, w_hh, f[1], f[2], f[3], ln, L, dg_dtype=step[5].dtype, merge_bwd=False)
        assert len(counters) == (not pf.ll) + (not pb.ll), (pf, pb)
        runs[ll] = list(f) + list(b[:6]) + list(b[6]) + [b[7]]
    assert not any(pl.ll for pl in plans[False])
    if DEV.type == "cpu":
        assert all(pl.ll for pl in plans[True])
    else:  # ln_ll_fits: both at B16 H256, the backward only at H768
        assert [pl.ll for pl in plans[True]] == [H == 256, True], plans[True]
    for i, (a, b) in enumerate(zip(runs[True], runs[False])):
        assert not torch.isnan(a).any(), f"output {i}: NaN (unwritten?)"
        if DEV.type == "cpu":
            assert torch.equal(a, b), f"output {i}: LL and barrier differ (rel err {rel_err(a, b):.2e})"
        else:
            check(a, b, CLOSE[dtype], f"output {i}: LL vs barrier")


class _LNLoops(torch.autograd.Function):
    """A layer-norm LSTM layer through the persistent loops only (for gradcheck)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, L):
        _, KL, PL, P, tiles = _mods()
        T, B, _ = x.shape
        H = w_hh.shape[1]
        ln = (gw, gb, cw, cb)
        out, hs, cs, gates = run_fwd(tiles.plan_ln("fwd", B, H, x.dtype, x.device)[0], x, h0, c0, w_ih, w_hh, b_ih,
                                     b_hh, ln, L)
        ctx.save_for_backward(x, w_ih, w_hh, hs, cs, gates, gw, gb, cw, cb)
        ctx.L = L
        return out, KL.last_h(hs, L), cs[T].clone()

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        _, _, PL, P, tiles = _mods()
        x, w_ih, w_hh, hs, cs, gates, gw, gb, cw, cb = ctx.saved_tensors
        B, H = x.shape[1], w_hh.shape[1]
        pl = tiles.plan_ln("bwd", B, H, x.dtype, x.device)[0]
        dx, dh0, dc0, dw_ih, dw_hh, db, dln, _ = run_bwd(pl, [dout, dh_n, dc_n], x, w_ih, w_hh, hs, cs, gates,
                                                         (gw, gb, cw, cb), ctx.L)
        return (dx, dh0, dc0, dw_ih, dw_hh, db, db, *dln, None)


@requires_kernels
def test_ln_persistent_gradcheck():
    """fp64 gradcheck of the persistent LN forward + backward for the inputs, weights, biases,
    initial states and all four LN parameters, with a zero and a partial length."""
    T, B, I, H = 3, 3, 2, 5
    ins, ln, L, _ = make_case(T, B, I, H, F64, [3, 0, 2])
    leaves = [t.detach().requires_grad_() for t in ins + ln]
    assert torch.autograd.gradcheck(lambda *a: _LNLoops.apply(*a, L), leaves, fast_mode=DEV.type == "cpu")


# ------------------------------------------------ the cross-program combine with P > 1 programs
try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: the kernel tests skip (requires_kernels)
    triton = None


if triton is not None:
    from fused_rnn.kernels import ln_exchange as LX, ln_lstm_persistent as PLK

    @triton.jit
    def _chan_test_kernel(s_ptr, m2_ptr, n_ptr, mean_ptr, m2_out_ptr, H,
                          BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
        # partials [BLOCK_P, BLOCK_B] of arbitrary (unequal) column chunks, counts [BLOCK_P]
        ps = tl.arange(0, BLOCK_P)
        rb = tl.arange(0, BLOCK_B)
        off = ps[:, None] * BLOCK_B + rb[None, :]
        mean, m2 = LX.chan_combine(tl.load(s_ptr + off), tl.load(m2_ptr + off), tl.load(n_ptr + ps), H)
        tl.store(mean_ptr + rb, mean)
        tl.store(m2_out_ptr + rb, m2)

    @triton.jit
    def _parts_test_kernel(v_ptr, part_ptr, mean_ptr, rstd_ptr, sum_ptr, P, H, eps,
                           BLOCK_H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, NQ: tl.constexpr):
        # P virtual programs, one after another: each writes the partials of its BLOCK_H columns
        # of v [BLOCK_B, H] exactly as the kernels do (_store_stats: slots 0, 1; and a
        # plain row sum in slot 2), then the combine reads all of them (_gate_stats, _sum_parts)
        rl = tl.arange(0, BLOCK_B)
        for p in range(P):
            cols = p * BLOCK_H + tl.arange(0, BLOCK_H)
            cmask = cols < H
            v = tl.load(v_ptr + rl[:, None] * H + cols[None, :], mask=cmask[None, :], other=0.0)
            LX.store_stats(part_ptr, p, 0, rl, v, cmask, tl.minimum(H - p * BLOCK_H, BLOCK_H), NQ, BLOCK_B)
            LX.store_part(part_ptr, p, 2, rl, tl.sum(tl.where(cmask[None, :], v * v, 0.0), axis=1), NQ, BLOCK_B)
        cnt = LX.block_counts(P, H, BLOCK_H, BLOCK_P)
        mean, rstd = LX.gate_stats(part_ptr, 0, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P)
        tl.store(mean_ptr + rl, mean)
        tl.store(rstd_ptr + rl, rstd)
        tl.store(sum_ptr + rl, LX.sum_parts(part_ptr, 2, rl, NQ, BLOCK_B, BLOCK_P))


@requires_kernels
@pytest.mark.parametrize("dtype", [F32, F64])
def test_chan_combine_unequal_chunks(dtype):
    """_chan_combine over P = 5 partials of unequal column chunks (one of a single column) plus
    three empty slots (n = 0) of an 8-slot tile: torch.var_mean of the whole rows."""
    g = torch.Generator().manual_seed(3)
    B, BP = 4, 8
    sizes = [7, 1, 12, 3, 10]
    H = sum(sizes)
    v = (torch.randn(B, H, generator=g, dtype=F64) * 3 + 5).to(dtype)  # an offset: tests the correction term
    s = torch.zeros(BP, B, dtype=dtype)
    m2 = torch.zeros(BP, B, dtype=dtype)
    n = torch.zeros(BP, dtype=torch.int32)
    for p, chunk in enumerate(torch.split(v, sizes, dim=1)):
        s[p] = chunk.sum(1)
        m2[p] = ((chunk - chunk.mean(1, keepdim=True)) ** 2).sum(1)
        n[p] = chunk.shape[1]
    s, m2, n = s.to(DEV), m2.to(DEV), n.to(DEV)
    mean = torch.full((B,), NAN, dtype=dtype, device=DEV)
    M2 = torch.full((B,), NAN, dtype=dtype, device=DEV)
    _chan_test_kernel[(1,)](s, m2, n, mean, M2, H, BLOCK_P=BP, BLOCK_B=B)
    var_ref, mean_ref = torch.var_mean(v.to(F64), dim=1, correction=0)
    bound = 1e-13 if dtype == F64 else 1e-6
    assert rel_err(mean.cpu(), mean_ref) <= bound
    assert rel_err(M2.cpu() / H, var_ref) <= bound
    # the correction term matters: the plain sum of the M2_p is far off
    assert rel_err(m2.sum(0).cpu() / H, var_ref) > 0.1


@requires_kernels
@pytest.mark.parametrize("H,BH", [(37, 8), (64, 16), (5, 8)])
def test_partials_layout_multi_program(H, BH):
    """The kernels' own partial layout and helpers with P = cdiv(H, BH) programs (the last one
    partial when BH does not divide H; P = 1 for H=5) in a BLOCK_P-slot buffer whose unused
    slots stay zero: mean, rstd and a plain row sum against torch over the whole rows."""
    g = torch.Generator().manual_seed(4)
    BB, NQ = 16, PLK.NQ
    P = triton.cdiv(H, BH)
    BP = max(2, triton.next_power_of_2(P))
    v = (torch.randn(BB, H, generator=g, dtype=F64) * 2 - 1).to(F32).to(DEV)
    part = torch.zeros((BP, NQ, BB), dtype=F32, device=DEV)
    mean, rstd, rsum = (torch.full((BB,), NAN, dtype=F32, device=DEV) for _ in range(3))
    _parts_test_kernel[(1,)](v, part, mean, rstd, rsum, P, H, LN_EPS, BLOCK_H=BH, BLOCK_B=BB, BLOCK_P=BP, NQ=NQ)
    var_ref, mean_ref = torch.var_mean(v.double(), dim=1, correction=0)
    assert rel_err(mean, mean_ref) <= 1e-6
    assert rel_err(rstd, 1 / torch.sqrt(var_ref + LN_EPS)) <= 1e-6
    assert rel_err(rsum, (v.double() ** 2).sum(1)) <= 1e-6
    assert (part[P:] == 0).all()  # slots past the grid untouched


# ------------------------------- the forward variants with P = 3 programs per row block (threads)
# tests/test_persistent_threads.py's fixtures: one thread per program under the interpreter, H100
# plans. Its LN cases run whichever variant the rule picks (MERGE_C at those sizes); these force
# each one, forward only (the backward does not change with the variant).
if triton is not None and INTERPRET:
    from test_persistent_threads import _problem, gpu_plans, threaded_grid  # noqa: F401 (fixtures)


# (T, B, I, H, lengths, dtype, resident W_hh, MERGE_C): H = 37 is 3 programs of 16 columns
THREAD_CASES = [
    (4, 3, 5, 37, [4, 2, 0], F32, True, False),
    (3, 3, 5, 37, [3, 1, 0], F64, False, False),
    (4, 3, 5, 37, [4, 2, 0], F64, False, True),
]


@pytest.mark.skipif(not INTERPRET or torch.cuda.is_available(), reason="the CPU lane under TRITON_INTERPRET=1")
@pytest.mark.parametrize("T,B,I,H,lengths,dtype,resident,merge", THREAD_CASES,
                         ids=[f"T{c[0]}-B{c[1]}-H{c[3]}-{DT_NAME[c[5]]}-{'resident' if c[6] else 'streamed'}-"
                              f"{'merge_c' if c[7] else '3bar'}" for c in THREAD_CASES])
def test_ln_fwd_variants_threaded(threaded_grid, gpu_plans, monkeypatch, use_options, T, B, I, H, lengths, dtype,
                                  resident, merge):
    """Each forward variant with 3 concurrent programs per row block against the step path."""
    _, KL, PL, P, tiles = _mods()
    gpu_plans["resident"] = resident
    use_options(merge_c=merge)
    p = _problem("lnlstm", T, B, I, H, dtype, lengths)
    args = (p["x"], p["h0"], p["c0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    step = KL.lstm_fwd(*args, ln=p["ln"], lengths=p["L"])
    seen = _count_barriers(monkeypatch)
    ours = KL.lstm_fwd(*args, ln=p["ln"], lengths=p["L"],
                       plan=launch_plan("persistent", "fwd", p["x"], p["w_hh"], p["ln"]))
    assert len(seen) == 1
    sync, per_step, pl = seen[0]
    assert pl.programs == 3 and pl.resident == resident and per_step == (2 if merge else 3)
    assert sync.tolist() == [per_step * T * 3]
    close = 1e-12 if dtype == F64 else 1e-6
    for i, (a, b) in enumerate(zip(ours, step)):
        assert a.shape == b.shape and not torch.isnan(a).any(), f"output {i}: NaN (unwritten?)"
        assert rel_err(a, b) <= close, f"output {i}: rel err {rel_err(a, b):.2e}"


@requires_kernels
@pytest.mark.parametrize("sid,dtype", [("T5-B3-H37-len", F64), ("T3-B17-H20-len", F32), ("T2-B70-H5-len", F64)])
def test_ln_bwd_two_barrier_variant(monkeypatch, sid, dtype):
    """MERGE_BWD (one reduction round a step: the gates' LayerNorm sums built from local sums and
    the c LayerNorm's) against the 3-barrier backward and the fp64 reference, with its barrier
    count."""
    T, B, I, H, lengths = SHAPES[sid]
    ins, ln, L, ups, pf, pb = _case_and_plans(sid, dtype)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
    out, hs, cs, gates = run_fwd(pf, *ins, ln, L)
    seen = _count_barriers(monkeypatch)
    res = {m: run_bwd(pb, ups, x, w_ih, w_hh, hs, cs, gates, ln, L, merge_bwd=m) for m in (False, True)}
    assert [per_step for _, per_step, _ in seen] == [3, 2]
    for sync, per_step, pl in seen:
        assert sync.tolist() == [per_step * T * pl.programs] * pl.row_blocks
    names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db", "dgw", "dgb", "dcw", "dcb"]
    two, three = res[True], res[False]
    close = {F64: 1e-12, F32: 1e-5}[dtype]
    for n, a, b in zip(names, [*two[:6], *two[6]], [*three[:6], *three[6]]):
        check(a, b, close, f"bwd {n}: 2 vs 3 barriers")
    check(two[7][:T], three[7][:T], close, "dG: 2 vs 3 barriers")
    _, ref_grads = reference(ins, ln, L, ups)
    check(two[7][:T], ref_grads[0], tol(dtype), "dG (2 barriers) vs reference")


@pytest.mark.skipif(not INTERPRET or torch.cuda.is_available(), reason="the CPU lane under TRITON_INTERPRET=1")
@pytest.mark.parametrize("T,B,I,H,lengths,dtype,resident", [(4, 3, 5, 37, [4, 2, 0], F64, True),
                                                             (3, 3, 5, 37, [3, 1, 0], F32, False)],
                         ids=["resident-f64", "streamed-f32"])
def test_ln_bwd_two_barrier_variant_threaded(threaded_grid, gpu_plans, monkeypatch, use_options, T, B, I, H,
                                             lengths, dtype, resident):
    """MERGE_BWD with 3 concurrent programs per row block against the step path's backward (the
    harness's own control, test_persistent_threads.py, shows its threads interleave; a control
    here, with these few steps, agreed by chance in 2 of 10 runs, so there is none)."""
    _, KL, PL, P, tiles = _mods()
    gpu_plans["resident"] = resident
    p = _problem("lnlstm", T, B, I, H, dtype, lengths)
    args = (p["x"], p["h0"], p["c0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"])
    f = KL.lstm_fwd(*args, ln=p["ln"], lengths=p["L"])

    def bwd(path):
        b = KL.lstm_bwd(p["dout"], p["dh"], p["dc"], p["x"], p["w_ih"], p["w_hh"], f[3], f[4], f[5], p["b_ih"],
                        p["b_hh"], ln=p["ln"], lengths=p["L"],
                        plan=launch_plan(path, "bwd", p["x"], p["w_hh"], p["ln"]))
        return list(b[:6]) + list(b[6])

    step = bwd("step")
    use_options(merge_bwd=True)
    seen = _count_barriers(monkeypatch)
    ours = bwd("persistent")
    assert [(per_step, pl.programs) for _, per_step, pl in seen] == [(2, 3)]
    assert seen[0][0].tolist() == [2 * T * 3]
    close = 1e-12 if dtype == F64 else 1e-5
    for i, (a, b) in enumerate(zip(ours, step)):
        assert not torch.isnan(a).any() and rel_err(a, b) <= close, f"output {i}: rel err {rel_err(a, b):.2e}"


# ---------------------------------------------------------------- CUDA: the multi-program path
CUDA_SHAPES = [(64, 16, 64, 256, None), (32, 64, 48, 512, "len")]  # (T, B, I, H, lengths)


def _cuda_cases():
    for shape in CUDA_SHAPES:
        for dtype in (BF16, F32):
            yield pytest.param(shape, dtype, None, id=f"T{shape[0]}-B{shape[1]}-H{shape[3]}-{DT_NAME[dtype]}")
    # the plan picks MERGE_C at B16 H256: the 3-barrier forward there too; and the 2-barrier
    # backward (MERGE_BWD, "bwd2") at both shapes
    shape = CUDA_SHAPES[0]
    for dtype in (BF16, F32):
        yield pytest.param(shape, dtype, False, id=f"T{shape[0]}-B{shape[1]}-H{shape[3]}-{DT_NAME[dtype]}-3bar")
    for shape in CUDA_SHAPES:
        yield pytest.param(shape, BF16, "bwd2", id=f"T{shape[0]}-B{shape[1]}-H{shape[3]}-bf16-bwd2")


@requires_cuda
@pytest.mark.parametrize("shape,dtype,merge", list(_cuda_cases()))
def test_cuda_ln_multi_program_matches_step(use_options, shape, dtype, merge):
    """The multi-program LN kernels (partial statistics across programs; the forward with 2 grid
    barriers a step where the plan picks MERGE_C, else 3; ``merge`` False forces 3; "bwd2": the
    2-barrier backward) against the step path and the fp64 reference, forward and backward."""
    C, KL, PL, P, tiles = _mods()
    use_options(merge_c=None if merge == "bwd2" else merge, merge_bwd=merge == "bwd2")
    T, B, I, H, lens = shape
    lengths = None if lens is None else [T - (b % 7) for b in range(B - 1)] + [0]
    ins, ln, L, ups = make_case(T, B, I, H, dtype, lengths)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
    pf, why = tiles.plan_ln("fwd", B, H, dtype, DEV)
    pb, why_b = tiles.plan_ln("bwd", B, H, dtype, DEV)
    assert pf is not None and pf.programs > 1 and pb is not None and pb.programs > 1, (why, why_b)
    step = KL.lstm_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, L)
    out, hs, cs, gates = run_fwd(pf, *ins, ln, L, like=step[3:])
    bwd = run_bwd(pb, ups, x, w_ih, w_hh, hs, cs, gates, ln, L)
    torch.cuda.synchronize()
    print(f"LN {DT_NAME[dtype]} {shape}: fwd {pf}, bwd {pb}, compiled: {P.LAST_LAUNCH}")
    close = {F32: 1e-4, BF16: 2e-2}[dtype]
    for name, a, b in (("out", out, step[0]), ("hs", hs, step[3]), ("cs", cs, step[4]), ("gates", gates, step[5])):
        check(a, b, close, f"fwd {name} vs step")
    step_b = KL.lstm_bwd(*ups, x, w_ih, w_hh, step[3], step[4], step[5], b_ih, b_hh, ln, L)
    names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db", "dgw", "dgb", "dcw", "dcb"]
    for n, a, b in zip(names, [*bwd[:6], *bwd[6]], [*step_b[:6], *step_b[6]]):
        check(a, b.to(a.dtype), close, f"bwd {n} vs step")
    ref_fwd, ref_grads = reference(ins, ln, L, ups)
    check(out, ref_fwd[0], tol(dtype), "out vs reference")
    check(bwd[7][:T], ref_grads[0], tol(dtype), "dG vs reference")


@requires_cuda
def test_cuda_ln_persistent_deterministic():
    """Two runs of the multi-program LN loops agree bitwise (fixed-order combines, no atomics on
    data; the barrier counters are per launch)."""
    _, _, PL, P, tiles = _mods()
    T, B, I, H = 16, 16, 64, 256
    ins, ln, L, ups = make_case(T, B, I, H, BF16, None)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = ins
    pf, _ = tiles.plan_ln("fwd", B, H, BF16, DEV)
    pb, _ = tiles.plan_ln("bwd", B, H, BF16, DEV)
    assert pf.programs > 1 and pb.programs > 1
    runs = []
    for _ in range(2):
        out, hs, cs, gates = run_fwd(pf, *ins, ln, L)
        dx, dh0, dc0, dw_ih, dw_hh, db, dln, dG = run_bwd(pb, ups, x, w_ih, w_hh, hs, cs, gates, ln, L)
        runs.append([out, hs, cs, gates, dG, dh0, dc0, *dln])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
