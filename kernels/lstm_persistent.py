"""The persistent plain LSTM: lstm_fwd_loop / lstm_bwd_loop run all T steps of one layer in one
launch (kernels/tiles.py: the plan; kernels/persistent.py: the barrier and LL exchange they share)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _dsigmoid, _dtanh, _gate_chunk_dots, _gate_tile_dots, _load_gates, _mm, _sigmoid, _store_gates, _tanh,
)
from .persistent import (
    barrier_arrive, barrier_finish, ll_get, ll_put, plain_launch, program_tile, record, row_chunk,
    w_tiles_bwd, w_tiles_fwd,
)
from .tiles import Plan


@triton.jit
def lstm_bwd_carry(dg_ptr, dg_row, rmask, w_ptr, wr, cols, cmask, H, ring_ptr, r_row, tag, LL: tl.constexpr,
                   ACC: tl.constexpr, RESIDENT: tl.constexpr, FMA: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                   NK: tl.constexpr):
    """dG_{t+1} W_hh on this program's columns: the rows dg_row of dG (every program's dG_{t+1},
    published before the barrier; or r_row of the LL ring, tag t+1) times the resident tiles
    ``wr`` (w_tiles_bwd, NK per gate; None when not RESIDENT) or W_hh streamed in BLOCK_K
    chunks of the K = 4H reduction. Both take the chunks in the same order (gate by gate), so
    where BLOCK_K divides H they sum the same products in the same order."""
    WT = w_ptr.dtype.element_ty
    G = 4 * H
    carry = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    if RESIDENT:
        kr = tl.arange(0, BLOCK_K)
        # (one base pointer for every load, moved by scalar offsets: fewer registers than one
        # address tile per gate)
        if LL:
            d_off = r_row[:, None] + kr[None, :]
        else:
            d_ptr = dg_ptr + dg_row[:, None] + kr[None, :]
        for q in tl.static_range(4):
            for kc in tl.static_range(NK):
                dm = rmask[:, None] & (kc * BLOCK_K + kr < H)[None, :]
                if LL:
                    v = ll_get(ring_ptr, d_off + (q * H + kc * BLOCK_K), dm, tag, WT)
                else:
                    v = tl.load(d_ptr + (q * H + kc * BLOCK_K), mask=dm, other=0.0, cache_modifier=".cg").to(WT)
                carry = _mm(v, wr[q * NK + kc], carry, FMA, IEEE, UPCAST)
    else:
        for k0 in range(0, G, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < G
            dgk = row_chunk(dg_ptr, dg_row, ks, rmask[:, None] & kmask[None, :], ring_ptr, r_row, tag, LL, WT)
            wk = tl.load(w_ptr + ks[:, None].to(tl.int64) * H + cols[None, :],
                         mask=kmask[:, None] & cmask[None, :], other=0.0)
            carry = _mm(dgk, wk, carry, FMA, IEEE, UPCAST)
    return carry


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "STORE_GATES": lambda a: a["gates_ptr"] is not None,
        "LL": lambda a: a["ring_ptr"] is not None,
        # the compute dtype (c is carried in registers; the saved cs may be 16-bit)
        "ACC": lambda a: tl.float64 if a["xp_ptr"].dtype == torch.float64 else tl.float32,
    }
)
@triton.jit(do_not_specialize=["T"])
def _lstm_fwd_persistent_kernel(
    xp_ptr,  # [T, B, G] x W_ihᵀ + b_ih + b_hh, storage dtype
    w_ptr,  # [G, H] W_hh
    hs_ptr,  # [T+1, B, H] lstm_hs_dtype: slot 0 = h0 in, slots 1..T the outputs (0 past the end)
    cs_ptr,  # [T+1, B, H] lstm_cs_dtype: slot 0 = c0 in, slots 1..T the carried c (held past the end)
    gates_ptr,  # [T, B, G] lstm_gates_dtype pre-activations, or None; may be xp_ptr
    len_ptr,  # [B] int64 lengths, or None
    sync_ptr,  # [row blocks] int32, zero (None with LL)
    ring_ptr,  # [2, B, H] int32 / int64 tagged h (see ll_put), all -1; or None: the barrier
    T, B, H,
    HAS_LENGTHS: tl.constexpr, STORE_GATES: tl.constexpr, ACC: tl.constexpr, LL: tl.constexpr,
    SOLO: tl.constexpr, RESIDENT: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NK: tl.constexpr, EARLY: tl.constexpr,
):
    pid, nprog, pid_b, rows, cols, rmask, cmask, mask = program_tile(B, H, BLOCK_B, BLOCK_H)
    if not LL and not SOLO:
        sync_ptr += pid_b  # this row block's barrier counter
    HT = hs_ptr.dtype.element_ty
    WT = w_ptr.dtype.element_ty
    G = 4 * H
    zero64 = tl.zeros([], dtype=tl.int64)
    # W_hh row of (gate q, unit j) starts at (q H + j) H
    w_i = cols.to(tl.int64) * H
    w_f = (cols + H).to(tl.int64) * H
    w_g = (cols + 2 * H).to(tl.int64) * H
    w_o = (cols + 3 * H).to(tl.int64) * H
    if RESIDENT:  # the slice, once
        kr = tl.arange(0, BLOCK_K)
        wr_i, wr_f, wr_g, wr_o = w_tiles_fwd(w_ptr, w_i, w_f, w_g, w_o, cmask, H, BLOCK_K, NK)

    b_off = (rows * H)[:, None] + cols[None, :]
    c = tl.load(cs_ptr + b_off, mask=mask, other=0.0).to(ACC)
    if LL:  # ring slot 0: this program's columns of h0, tag 0
        ll_put(ring_ptr, b_off, tl.load(hs_ptr + b_off, mask=mask, other=0.0).to(WT), zero64, mask)
    if SOLO:  # this program owns every column: h_{t-1} whole, as the matmul operand, in registers
        h_op = tl.load(hs_ptr + b_off, mask=mask, other=0.0).to(WT)
    if HAS_LENGTHS:
        L = tl.load(len_ptr + rows, mask=rmask, other=0)
    g_off = (rows * G)[:, None] + cols[None, :]  # step 0
    x_i, x_f, x_g, x_o = _load_gates(xp_ptr, g_off, H, mask, xp_ptr.dtype.element_ty)

    for t in range(T):
        t64 = zero64 + t
        h_row = (t64 * B + rows) * H  # slot t of hs: every program's h_{t-1}
        r_row = ((t64 % 2) * B + rows) * H  # the same row in the LL ring
        a_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        a_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        a_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        a_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        if RESIDENT:
            for kc in tl.static_range(NK):  # (NK = 1 but for w_chunks plans; SOLO: always 1)
                if SOLO:
                    hk = h_op
                else:
                    ks = kc * BLOCK_K + kr
                    hk = row_chunk(hs_ptr, h_row, ks, rmask[:, None] & (ks < H)[None, :], ring_ptr, r_row, t64, LL,
                                    WT)
                a_i, a_f, a_g, a_o = _gate_tile_dots(hk, wr_i[kc], wr_f[kc], wr_g[kc], wr_o[kc], a_i, a_f, a_g, a_o,
                                                     FMA, IEEE, UPCAST)
        else:
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < H
                hk = row_chunk(hs_ptr, h_row, ks, rmask[:, None] & kmask[None, :], ring_ptr, r_row, t64, LL, WT)
                a_i, a_f, a_g, a_o = _gate_chunk_dots(hk, w_ptr, w_i, w_f, w_g, w_o, ks, kmask, cmask,
                                                      a_i, a_f, a_g, a_o, FMA, IEEE, UPCAST)
        a_i += x_i.to(ACC)
        a_f += x_f.to(ACC)
        a_g += x_g.to(ACC)
        a_o += x_o.to(ACC)
        g_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]
        gi = _sigmoid(a_i)
        gf = _sigmoid(a_f)
        gg = _tanh(a_g)
        go = _sigmoid(a_o)
        c_new = gf * c + gi * gg
        h_new = go * _tanh(c_new)
        if HAS_LENGTHS:  # past a row's end: h_t 0 (the output), c held
            valid = (t64 < L)[:, None]
            h_new = tl.where(valid, h_new, 0.0)
            c = tl.where(valid, c_new, c)
        else:
            c = c_new
        if LL:  # first, so that the others can go on: ring slot (t+1) % 2, tag t+1
            ll_put(ring_ptr, ((((t64 + 1) % 2) * B + rows) * H)[:, None] + cols[None, :], h_new.to(HT).to(WT),
                    t64 + 1, mask)
        if SOLO:  # what hs[t+1] holds, as the next step's operand (0 in the padding: see the RNN's)
            h_op = tl.where(mask, h_new, 0.0).to(HT).to(WT)
        s_nxt = (((t64 + 1) * B + rows) * H)[:, None] + cols[None, :]
        tl.store(hs_ptr + s_nxt, h_new.to(HT), mask=mask)
        if EARLY:  # arrive now: the release then waits for the h_t stores only (Plan.early)
            barrier_arrive(sync_ptr)
        if STORE_GATES:
            _store_gates(gates_ptr, g_off, H, a_i, a_f, a_g, a_o, mask)
        tl.store(cs_ptr + s_nxt, c.to(cs_ptr.dtype.element_ty), mask=mask)

        # step t+1's input projection, before the barrier's wait (nothing at t+1 = T)
        nmask = tl.where(t + 1 < T, mask, False)  # (mask & scalar: wrong dtype in the interpreter)
        n_off = g_off + G * B
        x_i, x_f, x_g, x_o = _load_gates(xp_ptr, n_off, H, nmask, xp_ptr.dtype.element_ty)
        if not LL and not SOLO:
            barrier_finish(sync_ptr, (t + 1) * nprog, EARLY)


# Reverse step t (the step path's derivative, kernels/lstm.py, without LayerNorm):
#   gh_t  = [not valid_{t+1}] gh_{t+1} + dG_{t+1} W_hh      (this program's columns j of W_hh)
#   dh    = valid_t (dout_t + gh_t)      dc = valid_t gc_t + dz,  dz = dh o (1 - tanh² c_t)
#   di = dc g,  df = dc c_{t-1},  dg = dc i,  do = dh tanh c_t    (times the activations' slopes)
#   gc_{t-1} = valid_t dc f + [not valid_t] gc_t
# gh and gc stay in registers; the final ones (gh_0, gc_{-1}) are stored for the launcher.
@triton.heuristics({"HAS_LENGTHS": lambda a: a["len_ptr"] is not None, "LL": lambda a: a["ring_ptr"] is not None})
@triton.jit(do_not_specialize=["T"])
def _lstm_bwd_persistent_kernel(
    gates_ptr,  # [T, B, G] saved pre-activations, lstm_gates_dtype
    w_ptr,  # [G, H] W_hh
    cs_ptr,  # [T+1, B, H] saved c (lstm_cs_dtype)
    dout_ptr,  # [T, B, H] storage dtype
    dg_ptr,  # [T+1, B, G] grad_dtype: slot T zero (in), slots 0..T-1 out
    gh_ptr,  # [B, H] in: dh_n, out: gh_0
    gc_ptr,  # [B, H] in: dc_n, out: dc0
    len_ptr,  # [B] int64 lengths, or None
    sync_ptr,  # [row blocks] int32, zero (None with LL)
    ring_ptr,  # [2, B, G] int32 / int64 tagged dG (see ll_put), all -1; or None: the barrier
    T, B, H,
    HAS_LENGTHS: tl.constexpr, LL: tl.constexpr, SOLO: tl.constexpr, RESIDENT: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NK: tl.constexpr, EARLY: tl.constexpr,
):
    pid, nprog, pid_b, rows, cols, rmask, cmask, mask = program_tile(B, H, BLOCK_B, BLOCK_H)
    if not LL and not SOLO:
        sync_ptr += pid_b  # this row block's barrier counter
    ACC = gh_ptr.dtype.element_ty
    WT = w_ptr.dtype.element_ty
    DGT = dg_ptr.dtype.element_ty
    G = 4 * H
    zero64 = tl.zeros([], dtype=tl.int64)
    wr = None
    if RESIDENT:  # the slice, once
        wr = w_tiles_bwd(w_ptr, cols, cmask, H, BLOCK_K, NK)

    if HAS_LENGTHS:
        L = tl.minimum(tl.load(len_ptr + rows, mask=rmask, other=0), T)
    else:
        L = tl.zeros([BLOCK_B], dtype=tl.int64) + T
    b_off = (rows * H)[:, None] + cols[None, :]
    gh = tl.load(gh_ptr + b_off, mask=mask, other=0.0)
    gc = tl.load(gc_ptr + b_off, mask=mask, other=0.0)
    # step T-1's own tiles
    t_last = zero64 + T - 1
    g_off = ((t_last * B + rows) * G)[:, None] + cols[None, :]
    s_cur = ((t_last * B + rows) * H)[:, None] + cols[None, :]
    # step T-1's gates written out rather than through _load_gates: with the helper here ptxas
    # gave this kernel 158 registers instead of 128 at S1 (sm_90 compile, Triton 3.9)
    a_i = tl.load(gates_ptr + g_off, mask=mask, other=0.0).to(ACC)
    a_f = tl.load(gates_ptr + g_off + H, mask=mask, other=0.0).to(ACC)
    a_g = tl.load(gates_ptr + g_off + 2 * H, mask=mask, other=0.0).to(ACC)
    a_o = tl.load(gates_ptr + g_off + 3 * H, mask=mask, other=0.0).to(ACC)
    d_out = tl.load(dout_ptr + s_cur, mask=mask, other=0.0)
    c_prev = tl.load(cs_ptr + s_cur, mask=mask, other=0.0).to(ACC)  # c_{t-1} = slot t
    c_cur = tl.load(cs_ptr + s_cur + B * H, mask=mask, other=0.0).to(ACC)  # c_t = slot t+1
    if LL:  # ring slot T % 2: this program's columns of dG_T = 0, tag T
        zt = tl.zeros([BLOCK_B, BLOCK_H], dtype=WT)
        r_off = ((((t_last + 1) % 2) * B + rows) * G)[:, None] + cols[None, :]
        ll_put(ring_ptr, r_off, zt, t_last + 1, mask)
        ll_put(ring_ptr, r_off + H, zt, t_last + 1, mask)
        ll_put(ring_ptr, r_off + 2 * H, zt, t_last + 1, mask)
        ll_put(ring_ptr, r_off + 3 * H, zt, t_last + 1, mask)
    if SOLO:  # this program owns every column: dG_{t+1} whole (dG_T = 0), in registers
        d_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=WT)
        d_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=WT)
        d_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=WT)
        d_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=WT)

    for i in range(T):
        t64 = zero64 + (T - 1 - i)
        valid = (t64 < L)[:, None]
        nvalid = (t64 + 1 < L)[:, None]
        dg_row = ((t64 + 1) * B + rows) * G  # slot t+1 of dG: every program's dG_{t+1}
        r_row = (((t64 + 1) % 2) * B + rows) * G  # the same row in the LL ring
        if SOLO:  # (NK = 1)
            carry = _mm(d_i, wr[0], tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC), FMA, IEEE, UPCAST)
            carry = _mm(d_f, wr[1], carry, FMA, IEEE, UPCAST)
            carry = _mm(d_g, wr[2], carry, FMA, IEEE, UPCAST)
            carry = _mm(d_o, wr[3], carry, FMA, IEEE, UPCAST)
        else:
            carry = lstm_bwd_carry(dg_ptr, dg_row, rmask, w_ptr, wr, cols, cmask, H, ring_ptr, r_row, t64 + 1, LL,
                                    ACC, RESIDENT, FMA, IEEE, UPCAST, BLOCK_B, BLOCK_H, BLOCK_K, NK)
        gh = tl.where(nvalid, 0.0, gh) + carry
        dh = tl.where(valid, d_out.to(ACC) + gh, 0.0)
        dc = tl.where(valid, gc, 0.0)

        gi = _sigmoid(a_i)
        gf = _sigmoid(a_f)
        gg = _tanh(a_g)
        go = _sigmoid(a_o)
        tz = _tanh(c_cur)
        d_o = dh * tz
        vm = valid & mask
        dc += tl.where(vm, dh * go * _dtanh(tz), 0.0)
        dy_i = tl.where(vm, dc * gg * _dsigmoid(gi), 0.0)
        dy_f = tl.where(vm, dc * c_prev * _dsigmoid(gf), 0.0)
        dy_g = tl.where(vm, dc * gi * _dtanh(gg), 0.0)
        dy_o = tl.where(vm, d_o * _dsigmoid(go), 0.0)
        if LL:  # first, so that the others can go on: ring slot t % 2, tag t
            r_off = (((t64 % 2) * B + rows) * G)[:, None] + cols[None, :]
            ll_put(ring_ptr, r_off, dy_i.to(DGT).to(WT), t64, mask)
            ll_put(ring_ptr, r_off + H, dy_f.to(DGT).to(WT), t64, mask)
            ll_put(ring_ptr, r_off + 2 * H, dy_g.to(DGT).to(WT), t64, mask)
            ll_put(ring_ptr, r_off + 3 * H, dy_o.to(DGT).to(WT), t64, mask)
        if SOLO:  # what dG[t] holds, as the next step's operand
            d_i = dy_i.to(DGT).to(WT)
            d_f = dy_f.to(DGT).to(WT)
            d_g = dy_g.to(DGT).to(WT)
            d_o = dy_o.to(DGT).to(WT)
        g_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]
        _store_gates(dg_ptr, g_off, H, dy_i, dy_f, dy_g, dy_o, mask)
        gc = tl.where(valid, dc * gf, gc)
        if EARLY:  # arrive now: the release then waits for the dG_t stores only (Plan.early)
            barrier_arrive(sync_ptr)

        # step t-1's own tiles, before the barrier's wait (nothing at t = 0)
        pmask = tl.where(i + 1 < T, mask, False)
        p_off = g_off - G * B
        s_prv = ((t64 * B + rows) * H)[:, None] + cols[None, :] - B * H  # slot t-1
        a_i, a_f, a_g, a_o = _load_gates(gates_ptr, p_off, H, pmask, ACC)
        d_out = tl.load(dout_ptr + s_prv, mask=pmask, other=0.0)
        c_cur = c_prev
        c_prev = tl.load(cs_ptr + s_prv, mask=pmask, other=0.0).to(ACC)
        if not LL and not SOLO:
            barrier_finish(sync_ptr, (i + 1) * nprog, EARLY)
    tl.store(gh_ptr + b_off, gh, mask=mask)
    tl.store(gc_ptr + b_off, gc, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers: the time loops of kernels/lstm.py, in one launch. The callers
# allocate and own every buffer; these only check the plan and launch.
# ----------------------------------------------------------------------------------------------


def lstm_fwd_loop(pl: Plan, xp, w_hh, hs, cs, gates, lengths, fma, ieee, upcast) -> None:
    """All T forward steps: fills hs[1:] (the outputs), cs[1:] and (if not None) gates."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    sync, ring, opts = plain_launch(pl, T, B, H, H, w_hh, fma, ieee, upcast)
    k = _lstm_fwd_persistent_kernel[(pl.programs, pl.row_blocks)](
        xp, w_hh, hs, cs, gates, lengths, sync, ring, T, B, H, **opts)
    record("lstm_fwd", k)


def lstm_bwd_loop(pl: Plan, gates, w_hh, cs, dout, dG, gh, gc, lengths, fma, ieee, upcast) -> None:
    """All T reverse steps: fills dG[:T] (dG[T] must be zero), leaves gh_0 in gh and dc0 in gc."""
    T, B, H = dout.shape
    sync, ring, opts = plain_launch(pl, T, B, H, 4 * H, w_hh, fma, ieee, upcast)
    k = _lstm_bwd_persistent_kernel[(pl.programs, pl.row_blocks)](
        gates, w_hh, cs, dout, dG, gh, gc, lengths, sync, ring, T, B, H, **opts)
    record("lstm_bwd", k)
