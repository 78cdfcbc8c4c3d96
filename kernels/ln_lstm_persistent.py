"""The persistent layer-norm LSTM: ln_lstm_fwd_loop / ln_lstm_bwd_loop run all T steps of one
layer in one launch, as kernels/lstm_persistent.py does for the plain LSTM, with the same grid,
W_hh slices and barrier or LL exchange (kernels/persistent.py). Each LayerNorm (one per gate over
H, one over c_t) needs statistics of whole rows while a program owns BLOCK_H columns: each program
writes partial sums of its own columns to global memory, and after a barrier every program
combines all P of them in one fixed order (deterministic, no atomics on data; kernels/ln_exchange.py).

Legend: T steps, B rows (row blocks of BLOCK_B <= 64, R of them), H units, G = 4H (gates i, f, g,
o), P programs per row block, a_q the pre-LN gate pre-activations, x̂_q = (a_q - mean_q) rstd_q,
y_q = x̂_q γ_q + β_q, ĉ = (c_t - mean_c) rstd_c, z = ĉ γ_c + β_c, h_t = o tanh(z).
Forward step t: 1. a_q = xp_q[t] + h_{t-1} W_qᵀ, gates[t], partials of a -> barrier;
2. combine -> y_q, c_t, partials of c_t -> barrier; 3. combine -> h_t into hs[t+1] -> barrier
(h_t published). MERGE_C (2 barriers a step, fwd_merge_c): every program rebuilds all of h_{t-1}
from the published c_{t-1}, o_{t-1} rows at the start of step t.
Backward reverse step t: the row statistics come from the saved gates and cs (bwd_stats, with
torch before the launch); 1. carry = dG_{t+1} W_hh, gh, dh, dc, the c LayerNorm's and the o
gate's sums -> barrier; 2. combine -> dc, dG_o, the i, f, g gates' sums -> barrier; 3. combine
-> dG_i, dG_f, dG_g -> barrier (dG_t published). MERGE_BWD (2 barriers, Options.merge_bwd) forms
the last two rounds' sums at once, by linearity. The LN parameter gradients are summed per row
block into the caller's buffers. The LL exchange (Plan.ll) replaces each barrier by tagged words.
Buffers are kernels/lstm.py's; the compute dtype is cs's (forward) / gc's (backward).
docs/persistent.md has the phases in full, the hazards, the traffic and the sm_90 compiles.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _common, config
from ._common import (
    _dsigmoid, _dtanh, _gate_chunk_dots, _gate_tile_dots, _load_gates, _sigmoid, _store_gates, _tanh, _tile,
)
from .ln_exchange import (
    acc_cols, block_counts, gate_stats, h_operand, ifg, ln_bwd_phases23, lnback, load_stat, merged_dg, merged_h_own,
    merged_sums, norm, param, store_stats, store_sums, sum_parts,
)
from .lstm_persistent import lstm_bwd_carry
from .persistent import (
    LAST_LAUNCH, barrier_arrive, barrier_finish, check_plan, grid_barrier, launch_opts, ll_put, ll_ring, program_tile,
    record, row_chunk, w_tiles_bwd, w_tiles_fwd,
)
from .tiles import Plan, block_p, fwd_merge_c, k_pad

# partial slots per (program, row); statistic slots per (step, row) in the backward
NQ = 10
NQ_MERGED = 8  # the forward with MERGE_C: no partials of c_t (slots 0..7 only)
NSTAT = 10
BARRIERS_PER_STEP = 3  # the backward, and the forward without MERGE_C
BARRIERS_PER_STEP_MERGED = 2  # the forward with MERGE_C
# The backward's 2-barrier variant (MERGE_BWD, Options.merge_bwd): NQ_BWD_MERGED partials a row, read once.
NQ_BWD_MERGED = 22



@triton.heuristics(
    {
        "HAS_LENGTHS": lambda a: a["len_ptr"] is not None,
        "STORE_GATES": lambda a: a["gates_ptr"] is not None,
        "LL": lambda a: a["ring_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["T"])
def _ln_lstm_fwd_persistent_kernel(
    xp_ptr,  # [T, B, G] x W_ihᵀ + b_ih + b_hh, storage dtype
    w_ptr,  # [G, H] W_hh
    hs_ptr,  # [T+1, B, H] compute or storage dtype: slot 0 = h0 in, slots 1..T the outputs (0 past the end)
    cs_ptr,  # [T+1, B, H] compute dtype: slot 0 = c0 in, slots 1..T the carried c (held past the end)
    gates_ptr,  # [T, B, G] pre-LN pre-activations, or None
    len_ptr,  # [B] int64 lengths, or None
    gw_ptr, gb_ptr, cw_ptr, cb_ptr,  # LN weights: gates [G], [G]; cell [H], [H]
    part_ptr,  # [R, 2, BLOCK_P, NQ, BLOCK_B] compute dtype, zeroed: 0..7 (S, M2) of i, f, g, o; 8, 9 of c
    #            (LL: int64 tagged words, all -1)
    cell_ptr,  # MERGE_C: [R, 2, 2, BLOCK_B, H] compute dtype: [r, s % 2, 0 / 1] = c_s / o_s rows; else None
    sync_ptr,  # [R] int32, zero (None with LL)
    ring_ptr,  # LL: [2, B, H] int32 / int64 tagged h (persistent.ll_put), all -1; else None
    T, B, H, eps,
    HAS_LENGTHS: tl.constexpr, STORE_GATES: tl.constexpr, LL: tl.constexpr, RESIDENT: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    NQ: tl.constexpr, MERGE_C: tl.constexpr, BLOCK_S: tl.constexpr, EARLY: tl.constexpr, NK: tl.constexpr,
):
    """The forward, 3 grid barriers a step, or 2 with MERGE_C, or none with LL (module
    docstring). BLOCK_S: next_pow2(H) with MERGE_C (the c / o row tile), unused otherwise."""
    pid, nprog, pid_b, rows, cols, rmask, cmask, mask = program_tile(B, H, BLOCK_B, BLOCK_H)
    if not LL:
        sync_ptr += pid_b  # this row block's barrier counter
    rl = tl.arange(0, BLOCK_B)  # row within the block: the partials' row index
    part_rb = part_ptr + pid_b * (2 * BLOCK_P * NQ * BLOCK_B)
    ACC = cs_ptr.dtype.element_ty
    HT = hs_ptr.dtype.element_ty
    WT = w_ptr.dtype.element_ty
    G = 4 * H
    zero64 = tl.zeros([], dtype=tl.int64)
    n_own = tl.minimum(H - pid * BLOCK_H, BLOCK_H)  # this program's valid columns
    cnt = block_counts(nprog, H, BLOCK_H, BLOCK_P)
    # W_hh row of (gate q, unit j) starts at (q H + j) H
    w_i = cols.to(tl.int64) * H
    w_f = (cols + H).to(tl.int64) * H
    w_g = (cols + 2 * H).to(tl.int64) * H
    w_o = (cols + 3 * H).to(tl.int64) * H
    if RESIDENT:  # the slice, once
        kr = tl.arange(0, BLOCK_K)
        krm = kr < H
        wr_i, wr_f, wr_g, wr_o = w_tiles_fwd(w_ptr, w_i, w_f, w_g, w_o, cmask, H, BLOCK_K, NK)

    b_off = (rows * H)[:, None] + cols[None, :]
    c = tl.load(cs_ptr + b_off, mask=mask, other=0.0).to(ACC)
    if LL:  # ring slot 0: this program's columns of h0, tag 0
        ll_put(ring_ptr, b_off, tl.load(hs_ptr + b_off, mask=mask, other=0.0).to(WT), zero64, mask)
    if HAS_LENGTHS:
        L = tl.load(len_ptr + rows, mask=rmask, other=0)
    if MERGE_C:
        cell_rb = cell_ptr + pid_b.to(tl.int64) * (4 * BLOCK_B * H)  # this row block's [2, 2, BLOCK_B, H]
        crl = rl * H  # row offsets within a [BLOCK_B, H] slab
        go = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)  # o_{t-1} on the own columns, carried to step t
    g_off = (rows * G)[:, None] + cols[None, :]  # step 0
    x_i, x_f, x_g, x_o = _load_gates(xp_ptr, g_off, H, mask, xp_ptr.dtype.element_ty)

    for t in range(T):
        t64 = zero64 + t
        h_row = (t64 * B + rows) * H  # slot t of hs: every program's h_{t-1}
        r_row = ((t64 % 2) * B + rows) * H  # the same row in the LL ring
        # partials alternate between two halves by step parity (the addresses then depend on t,
        # which keeps the compiler from hoisting every address tile out of the loop: fewer
        # registers in sm_90 compiles; not needed for correctness, docs/persistent.md)
        pp = part_rb + (t % 2) * (BLOCK_P * NQ * BLOCK_B)
        if MERGE_C:
            # ---- phase 0 (MERGE_C): h_{t-1} from the c_{t-1}, o_{t-1} rows every program
            # published at step t-1 (cell slot (t-1) % 2). "fresh" rows: t > 0 and step t-1 valid;
            # the others: h0 at t = 0, else 0 (step t-1's output past the row's end)
            fresh = tl.where(t64 > 0, rmask, False)
            if HAS_LENGTHS:
                fresh = fresh & (t64 - 1 < L)
            first = tl.where(t64 == 0, rmask, False)
            cp = cell_rb + ((t + 1) % 2) * (2 * BLOCK_B * H)
            m_c, r_c, c_rows = merged_h_own(cp, crl, fresh, c, go, hs_ptr, cw_ptr, cb_ptr,
                                            t64, rows, cols, cmask, mask, B, H, eps, ACC, BLOCK_S)
            h0_row = rows * H  # hs[0]
        # ---- phase 1: the recurrent matmul on the own slice, partial gate statistics
        a_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        a_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        a_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        a_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        if RESIDENT:
            for kc in tl.static_range(NK):  # (NK > 1: Plan.w_chunks, never with MERGE_C)
                if MERGE_C:  # the c row tile of phase 0 is this chunk (BLOCK_S = BLOCK_K = K_pad)
                    hk = h_operand(c_rows, cp + BLOCK_B * H + crl, hs_ptr + h0_row, kr, krm, fresh, first, m_c, r_c,
                                   cw_ptr, cb_ptr, ACC, hs_ptr.dtype.element_ty, WT)
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
                if MERGE_C:  # c re-read by chunk (L2) rather than sliced from phase 0's tile
                    ck = tl.load(cp + crl[:, None] + ks[None, :], mask=fresh[:, None] & kmask[None, :], other=0.0,
                                 cache_modifier=".cg")
                    hk = h_operand(ck, cp + BLOCK_B * H + crl, hs_ptr + h0_row, ks, kmask, fresh, first, m_c, r_c,
                                   cw_ptr, cb_ptr, ACC, hs_ptr.dtype.element_ty, WT)
                else:
                    hk = row_chunk(hs_ptr, h_row, ks, rmask[:, None] & kmask[None, :], ring_ptr, r_row, t64, LL, WT)
                a_i, a_f, a_g, a_o = _gate_chunk_dots(hk, w_ptr, w_i, w_f, w_g, w_o, ks, kmask, cmask,
                                                      a_i, a_f, a_g, a_o, FMA, IEEE, UPCAST)
        a_i += x_i.to(ACC)
        a_f += x_f.to(ACC)
        a_g += x_g.to(ACC)
        a_o += x_o.to(ACC)
        g_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]
        store_stats(pp, pid, 0, rl, a_i, cmask, n_own, NQ, BLOCK_B, t64, LL)
        store_stats(pp, pid, 2, rl, a_f, cmask, n_own, NQ, BLOCK_B, t64, LL)
        store_stats(pp, pid, 4, rl, a_g, cmask, n_own, NQ, BLOCK_B, t64, LL)
        store_stats(pp, pid, 6, rl, a_o, cmask, n_own, NQ, BLOCK_B, t64, LL)
        if EARLY:  # arrive after the partials the others read; the gates (the backward's) after it
            barrier_arrive(sync_ptr)
        if STORE_GATES:
            _store_gates(gates_ptr, g_off, H, a_i, a_f, a_g, a_o, mask)
        if not LL:
            barrier_finish(sync_ptr, ((2 if MERGE_C else 3) * t + 1) * nprog, EARLY)

        # ---- phase 2: gate LayerNorms, the cell update; then partial statistics of c_t (3 barriers) or
        # c_t, o_t published (MERGE_C)
        mean, rstd = gate_stats(pp, 0, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
        gi = _sigmoid(norm(a_i, mean, rstd, cmask) * param(gw_ptr, 0, cols, cmask, ACC)[None, :]
                      + param(gb_ptr, 0, cols, cmask, ACC)[None, :])
        mean, rstd = gate_stats(pp, 2, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
        gf = _sigmoid(norm(a_f, mean, rstd, cmask) * param(gw_ptr, H, cols, cmask, ACC)[None, :]
                      + param(gb_ptr, H, cols, cmask, ACC)[None, :])
        mean, rstd = gate_stats(pp, 4, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
        gg = _tanh(norm(a_g, mean, rstd, cmask) * param(gw_ptr, 2 * H, cols, cmask, ACC)[None, :]
                   + param(gb_ptr, 2 * H, cols, cmask, ACC)[None, :])
        mean, rstd = gate_stats(pp, 6, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
        go = _sigmoid(norm(a_o, mean, rstd, cmask) * param(gw_ptr, 3 * H, cols, cmask, ACC)[None, :]
                      + param(gb_ptr, 3 * H, cols, cmask, ACC)[None, :])
        c_new = gf * c + gi * gg
        s_nxt = (((t64 + 1) * B + rows) * H)[:, None] + cols[None, :]
        # step t+1's input projection, before the step's last barrier (nothing at t+1 = T)
        nmask = tl.where(t + 1 < T, mask, False)  # (mask & scalar: wrong dtype in the interpreter)
        n_off = g_off + G * B
        if MERGE_C:
            # ---- c_t and o_t of the own columns to cell slot t % 2 (c unheld: what h_t is made of);
            # cs[t+1] gets the held c. h_t itself is made in phase 0 of step t+1 (or after the loop).
            if HAS_LENGTHS:
                c = tl.where((t64 < L)[:, None], c_new, c)
            else:
                c = c_new
            cq = cell_rb + (t % 2) * (2 * BLOCK_B * H) + crl[:, None] + cols[None, :]
            tl.store(cq, c_new, mask=mask)
            tl.store(cq + BLOCK_B * H, go, mask=mask)
        else:
            store_stats(pp, pid, 8, rl, c_new, cmask, n_own, NQ, BLOCK_B, t64, LL)
            if not LL:
                grid_barrier(sync_ptr, (3 * t + 2) * nprog)

            # ---- phase 3: the cell LayerNorm, h_t; publish
            mean, rstd = gate_stats(pp, 8, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
            h_new = go * _tanh(norm(c_new, mean, rstd, cmask) * param(cw_ptr, 0, cols, cmask, ACC)[None, :]
                               + param(cb_ptr, 0, cols, cmask, ACC)[None, :])
            if HAS_LENGTHS:  # past a row's end: h_t 0 (the output), c held
                valid = (t64 < L)[:, None]
                h_new = tl.where(valid, h_new, 0.0)
                c = tl.where(valid, c_new, c)
            else:
                c = c_new
            if LL:  # first, so that the others can go on: ring slot (t+1) % 2, tag t+1
                ll_put(ring_ptr, ((((t64 + 1) % 2) * B + rows) * H)[:, None] + cols[None, :],
                        h_new.to(HT).to(WT), t64 + 1, mask)
            tl.store(hs_ptr + s_nxt, h_new.to(HT), mask=mask)
        # the step's last barrier: arrive after what the others read (MERGE_C: the c, o rows; else
        # the h_t row; see Options.early_arrive), then cs[t+1] (the held c) and the next step's
        # input projection
        if EARLY:
            barrier_arrive(sync_ptr)
        tl.store(cs_ptr + s_nxt, c.to(cs_ptr.dtype.element_ty), mask=mask)
        x_i, x_f, x_g, x_o = _load_gates(xp_ptr, n_off, H, nmask, xp_ptr.dtype.element_ty)
        if not LL:
            barrier_finish(sync_ptr, (2 if MERGE_C else 3) * (t + 1) * nprog, EARLY)

    if MERGE_C:  # h_{T-1} of the own columns: hs[T] (no matmul operand to rebuild)
        t64 = zero64 + T
        fresh = tl.where(t64 > 0, rmask, False)
        if HAS_LENGTHS:
            fresh = fresh & (t64 - 1 < L)
        cp = cell_rb + ((T + 1) % 2) * (2 * BLOCK_B * H)
        merged_h_own(cp, crl, fresh, c, go, hs_ptr, cw_ptr, cb_ptr, t64, rows, cols, cmask, mask,
                     B, H, eps, ACC, BLOCK_S)



@triton.heuristics({"HAS_LENGTHS": lambda a: a["len_ptr"] is not None, "LL": lambda a: a["ring_ptr"] is not None})
@triton.jit(do_not_specialize=["T"])
def _ln_lstm_bwd_persistent_kernel(
    gates_ptr,  # [T, B, G] saved pre-LN pre-activations
    w_ptr,  # [G, H] W_hh
    cs_ptr,  # [T+1, B, H] saved c: slot t = c_{t-1}, slot t+1 = c_t
    dout_ptr,  # [T, B, H] storage dtype
    dg_ptr,  # [T+1, B, G] compute or storage dtype: slot T zero (in), slots 0..T-1 out
    gh_ptr,  # [B, H] compute dtype; in: dh_n, out: gh_0
    gc_ptr,  # [B, H] compute dtype; in: dc_n, out: dc0
    len_ptr,  # [B] int64 lengths, or None
    gw_ptr, gb_ptr, cw_ptr, cb_ptr,  # LN weights: gates [G], [G]; cell [H], [H]
    stat_ptr,  # [T, R, NSTAT, BLOCK_B] compute dtype: mean, rstd of gates i, f, g, o (0..7), of c_t (8, 9)
    part_ptr,  # [R, 2, BLOCK_P, NQ, BLOCK_B] compute dtype, zeroed: 0..3 phase-1 sums, 4..9 phase-2 sums
    #            (LL: int64 tagged words, all -1)
    dgw_ptr, dgb_ptr, dcw_ptr, dcb_ptr,  # [>= R, G], [>= R, G], [>= R, H], [>= R, H]: row r accumulated
    sync_ptr,  # [R] int32, zero (None with LL)
    ring_ptr,  # LL: [2, B, G] int32 / int64 tagged dG (persistent.ll_put), all -1; else None
    T, B, H,
    HAS_LENGTHS: tl.constexpr, LL: tl.constexpr, RESIDENT: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    NQ: tl.constexpr, NSTAT: tl.constexpr, MERGE_BWD: tl.constexpr, EARLY: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid_b = tl.program_id(1)  # the row block
    nrb = tl.num_programs(1)
    rows, cols, rmask, cmask, mask = _tile(pid_b, pid, B, H, BLOCK_B, BLOCK_H)
    if not LL:
        sync_ptr += pid_b  # this row block's barrier counter
    rl = tl.arange(0, BLOCK_B)
    part_rb = part_ptr + pid_b * (2 * BLOCK_P * NQ * BLOCK_B)
    ACC = gc_ptr.dtype.element_ty
    WT = w_ptr.dtype.element_ty
    G = 4 * H
    zero64 = tl.zeros([], dtype=tl.int64)
    wr = None
    if RESIDENT:  # the slice, once
        wr = w_tiles_bwd(w_ptr, cols, cmask, H, BLOCK_K, 1)
    # LN parameter gradients of the own columns, summed over rows and steps, in row r = pid_b of
    # the caller's buffers (only this program touches these columns; in memory, not registers:
    # ten register vectors over the loop spilled)
    pg = dgw_ptr + pid_b.to(tl.int64) * G + cols
    pgb = dgb_ptr + pid_b.to(tl.int64) * G + cols
    pcw = dcw_ptr + pid_b.to(tl.int64) * H + cols
    pcb = dcb_ptr + pid_b.to(tl.int64) * H + cols

    if HAS_LENGTHS:
        L = tl.minimum(tl.load(len_ptr + rows, mask=rmask, other=0), T)
    else:
        L = tl.zeros([BLOCK_B], dtype=tl.int64) + T
    b_off = (rows * H)[:, None] + cols[None, :]
    gh = tl.load(gh_ptr + b_off, mask=mask, other=0.0).to(ACC)
    gc = tl.load(gc_ptr + b_off, mask=mask, other=0.0).to(ACC)
    # step T-1's own tiles
    t_last = zero64 + T - 1
    g_off = ((t_last * B + rows) * G)[:, None] + cols[None, :]
    s_cur = ((t_last * B + rows) * H)[:, None] + cols[None, :]
    a_i, a_f, a_g, a_o = _load_gates(gates_ptr, g_off, H, mask, gates_ptr.dtype.element_ty)
    d_out = tl.load(dout_ptr + s_cur, mask=mask, other=0.0)
    c_prev = tl.load(cs_ptr + s_cur, mask=mask, other=0.0)  # c_{t-1} = slot t
    c_cur = tl.load(cs_ptr + s_cur + B * H, mask=mask, other=0.0)  # c_t = slot t+1
    if LL:  # ring slot T % 2: this program's columns of dG_T = 0, tag T
        zt = tl.zeros([BLOCK_B, BLOCK_H], dtype=WT)
        r_off = ((((t_last + 1) % 2) * B + rows) * G)[:, None] + cols[None, :]
        for q in tl.static_range(4):
            ll_put(ring_ptr, r_off + q * H, zt, t_last + 1, mask)
    for i in range(T):
        t64 = zero64 + (T - 1 - i)
        i64 = zero64 + i  # the partials' LL tag
        pp = part_rb + (i % 2) * (BLOCK_P * NQ * BLOCK_B)  # step parity, as in the forward
        valid = (t64 < L)[:, None]
        nvalid = (t64 + 1 < L)[:, None]
        vm = valid & mask
        amask = tl.where(i > 0, cmask, False)  # read the LN-gradient accumulators after step T-1
        # ---- phase 1: carried gradient, the cell LayerNorm's and the o gate's row sums
        dg_row = ((t64 + 1) * B + rows) * G  # slot t+1 of dG: every program's dG_{t+1}
        r_row = (((t64 + 1) % 2) * B + rows) * G  # the same row in the LL ring
        carry = lstm_bwd_carry(dg_ptr, dg_row, rmask, w_ptr, wr, cols, cmask, H, ring_ptr, r_row, t64 + 1, LL, ACC,
                                RESIDENT, FMA, IEEE, UPCAST, BLOCK_B, BLOCK_H, BLOCK_K, 1)
        gh = tl.where(nvalid, 0.0, gh) + carry
        dh = tl.where(valid, d_out.to(ACC) + gh, 0.0)
        dc = tl.where(valid, gc, 0.0)

        # this step's LN statistics, loaded where used (not prefetched across the barrier like the
        # tiles: fewer live registers; bwd B16 H256 spilled with them, sm_90 compile)
        st = stat_ptr + (t64 * nrb + pid_b) * (NSTAT * BLOCK_B)
        m_o = load_stat(st, 6, rl, NSTAT, BLOCK_B)
        r_o = load_stat(st, 7, rl, NSTAT, BLOCK_B)
        m_c = load_stat(st, 8, rl, NSTAT, BLOCK_B)
        r_c = load_stat(st, 9, rl, NSTAT, BLOCK_B)
        gw_o = param(gw_ptr, 3 * H, cols, cmask, ACC)
        cw = param(cw_ptr, 0, cols, cmask, ACC)
        # this order (tz, then go) for the registers (B16 H256 spilled 16 B, sm_90 compile)
        chat = norm(c_cur.to(ACC), m_c, r_c, cmask)
        tz = _tanh(chat * cw[None, :] + param(cb_ptr, 0, cols, cmask, ACC)[None, :])
        xh_o = norm(a_o.to(ACC), m_o, r_o, cmask)
        go = _sigmoid(xh_o * gw_o[None, :] + param(gb_ptr, 3 * H, cols, cmask, ACC)[None, :])
        dy_o = tl.where(vm, dh * tz * _dsigmoid(go), 0.0)
        dz = tl.where(vm, dh * go * _dtanh(tz), 0.0)
        u = dz * cw[None, :]
        v_o = dy_o * gw_o[None, :]
        store_sums(pp, pid, 0, rl, u, chat, NQ, BLOCK_B, i64, LL)
        store_sums(pp, pid, 2, rl, v_o, xh_o, NQ, BLOCK_B, i64, LL)
        acc_cols(pcw, tl.sum(dz * chat, axis=0), amask, cmask)
        acc_cols(pcb, tl.sum(dz, axis=0), amask, cmask)
        acc_cols(pg + 3 * H, tl.sum(dy_o * xh_o, axis=0), amask, cmask)
        acc_cols(pgb + 3 * H, tl.sum(dy_o, axis=0), amask, cmask)
        if MERGE_BWD:
            # dc = P - (r_c / H)(S1 + ĉ S2) with P local and S1, S2 the c sums above, so each
            # gate's sums Σ v_q, Σ v_q x̂_q (v_q = dc E_q) are combinations of local sums: all in
            # this one round (slots 4 + 6 q + 0..5)
            P = dc + r_c[:, None] * u
            gi, gf, gg, xh_i, xh_f, xh_g, r_i, r_f, r_g = ifg(st, a_i, a_f, a_g, gw_ptr, gb_ptr, cols, cmask, rl,
                                                              H, ACC, NSTAT, BLOCK_B)
            F_i = tl.where(vm, gg * _dsigmoid(gi), 0.0)
            F_f = tl.where(vm, c_prev.to(ACC) * _dsigmoid(gf), 0.0)
            F_g = tl.where(vm, gi * _dtanh(gg), 0.0)
            merged_sums(pp, pid, 4, P, chat, F_i * param(gw_ptr, 0, cols, cmask, ACC)[None, :], xh_i, rl,
                        NQ, BLOCK_B)
            merged_sums(pp, pid, 10, P, chat, F_f * param(gw_ptr, H, cols, cmask, ACC)[None, :], xh_f, rl,
                        NQ, BLOCK_B)
            merged_sums(pp, pid, 16, P, chat, F_g * param(gw_ptr, 2 * H, cols, cmask, ACC)[None, :], xh_g, rl,
                        NQ, BLOCK_B)
            grid_barrier(sync_ptr, (2 * i + 1) * nprog)

            # ---- phase 2 (MERGE_BWD): dc, then dG of all four gates; publish
            s1 = sum_parts(pp, 0, rl, NQ, BLOCK_B, BLOCK_P)
            s2 = sum_parts(pp, 1, rl, NQ, BLOCK_B, BLOCK_P)
            kc = r_c / H
            dc = P - kc[:, None] * (s1[:, None] + chat * s2[:, None])
            dgty = dg_ptr.dtype.element_ty
            g_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]
            tl.store(dg_ptr + g_off + 3 * H, lnback(v_o, xh_o, sum_parts(pp, 2, rl, NQ, BLOCK_B, BLOCK_P),
                                                    sum_parts(pp, 3, rl, NQ, BLOCK_B, BLOCK_P), r_o, H).to(dgty),
                     mask=mask)
            merged_dg(pp, 4, dc, F_i, xh_i, r_i, s1, s2, kc, gw_ptr, 0, pg, pgb, dg_ptr + g_off, amask, cols, cmask,
                      mask, rl, H, ACC, NQ, BLOCK_B, BLOCK_P)
            merged_dg(pp, 10, dc, F_f, xh_f, r_f, s1, s2, kc, gw_ptr, H, pg, pgb, dg_ptr + g_off, amask, cols,
                      cmask, mask, rl, H, ACC, NQ, BLOCK_B, BLOCK_P)
            merged_dg(pp, 16, dc, F_g, xh_g, r_g, s1, s2, kc, gw_ptr, 2 * H, pg, pgb, dg_ptr + g_off, amask, cols,
                      cmask, mask, rl, H, ACC, NQ, BLOCK_B, BLOCK_P)
            gc = tl.where(valid, dc * gf, gc)
        else:
            if not LL:
                grid_barrier(sync_ptr, (3 * i + 1) * nprog)
            gc, g_off = ln_bwd_phases23(pp, pid, rl, st, dc, u, chat, r_c, v_o, xh_o, r_o, a_i, a_f, a_g, c_prev,
                                        vm, valid, gc, gw_ptr, gb_ptr, pg, pgb, dg_ptr, amask, cols, cmask, mask, rows,
                                        t64, B, H, G, sync_ptr, (3 * i + 2) * nprog, ring_ptr, nprog, i64, ACC, NQ,
                                        NSTAT, BLOCK_B, BLOCK_P, LL, WT)

        if EARLY:  # arrive after the dG_t row the others read (see Options.early_arrive)
            barrier_arrive(sync_ptr)

        # step t-1's own tiles, before the barrier's wait (nothing at t = 0)
        pmask = tl.where(i + 1 < T, mask, False)
        p_off = g_off - G * B
        s_prv = ((t64 * B + rows) * H)[:, None] + cols[None, :] - B * H  # slot t-1
        a_i, a_f, a_g, a_o = _load_gates(gates_ptr, p_off, H, pmask, gates_ptr.dtype.element_ty)
        d_out = tl.load(dout_ptr + s_prv, mask=pmask, other=0.0)
        c_cur = c_prev
        c_prev = tl.load(cs_ptr + s_prv, mask=pmask, other=0.0)
        if not LL:
            barrier_finish(sync_ptr, (2 if MERGE_BWD else 3) * (i + 1) * nprog, EARLY)

    tl.store(gh_ptr + b_off, gh.to(gh_ptr.dtype.element_ty), mask=mask)
    tl.store(gc_ptr + b_off, gc.to(gc_ptr.dtype.element_ty), mask=mask)



# ----------------------------------------------------------------------------------------------
# Launchers: drop-in replacements for the layer-norm step loops of kernels/lstm.py. The callers
# allocate and own every buffer; these check shapes and the plan, and launch.
# ----------------------------------------------------------------------------------------------


def kernel_eps(eps: float, device) -> float:
    """eps as the kernels add it: a Python float argument is compiled as an fp32 scalar on CUDA
    (so the fp64 kernels, step path included, add the fp32-rounded value there), while the
    interpreter (CPU) keeps the Python float. The backward statistics computed with torch use the
    same number as the forward kernel did."""
    if torch.device(device).type == "cuda":
        return torch.tensor(eps, dtype=torch.float32).item()
    return float(eps)


def _ln_params(ln: Sequence[torch.Tensor], H: int):
    gw, gb, cw, cb = (p.contiguous() for p in ln)
    G = 4 * H
    assert gw.shape == (G,) and gb.shape == (G,) and cw.shape == (H,) and cb.shape == (H,), "LN parameter shapes"
    return gw, gb, cw, cb


def _check_buffers(*ts) -> None:
    for t in ts:
        if t is not None:
            assert t.is_contiguous(), "persistent LN kernels take contiguous buffers"


def _partials(pl: Plan, dtype: torch.dtype, device, nq: int = NQ) -> torch.Tensor:
    # [R, 2 (step parity), BLOCK_P, nq, BLOCK_B]; zeroed: the slots of programs p >= P are read
    # (as zeros) by the unmasked combine loads and never written. LL: int64 tagged words of fp32
    # values, all -1 (no step), the slots p >= P masked out by the readers
    shape = (pl.row_blocks, 2, block_p(pl.programs), nq, pl.BLOCK_B)
    if pl.ll:
        assert dtype == torch.float32, "LL partials: fp32 values in 64-bit words"
        return torch.full(shape, -1, dtype=torch.int64, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _ln_sync_counter(T: int, pl: Plan, device, per_step: int = BARRIERS_PER_STEP) -> torch.Tensor:
    # barrier n waits for n P <= per_step T P arrivals: keep that in int32; one counter per row block
    if per_step * T * pl.programs >= 2 ** 31:
        raise ValueError(f"persistent LN kernels: {per_step} x T={T} x {pl.programs} programs "
                         "overflows the int32 barrier counter")
    return torch.zeros(pl.row_blocks, dtype=torch.int32, device=device)




def fwd_barriers_per_step(pl: Plan, H: int) -> int:
    if pl.ll:
        return 0
    return BARRIERS_PER_STEP_MERGED if fwd_merge_c(pl, H) else BARRIERS_PER_STEP


def _check_ln_plan(pl: Plan, B: int, H: int, device) -> int:
    check_plan(pl, B, H, device)  # the deadlock guard (co-residency), as persistent.py's
    assert not pl.solo, "the LN kernels: no solo plan"
    bp = block_p(pl.programs)
    assert bp >= pl.programs
    return bp


def ln_lstm_fwd_loop(pl: Plan, xp, w_hh, hs, cs, gates, ln, lengths, eps, fma, ieee, upcast,
                     merge_c: Optional[bool] = None) -> None:
    """All T forward steps of the layer-norm LSTM: fills hs[1:] (the outputs), cs[1:] and (if
    not None) gates, as kernels.lstm.lstm_fwd(..., ln=ln, path="step") does with the same buffers.
    hs[0], cs[0] hold h0, c0. The compute dtype is cs's (fp32 / fp64); hs may be cs's dtype or the
    storage dtype. ``merge_c``: the 2-barrier variant (True) or the 3-barrier one (False);
    None: fwd_merge_c(pl, H)."""
    T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    BP = _check_ln_plan(pl, B, H, xp.device)
    gw, gb, cw, cb = _ln_params(ln, H)
    _check_buffers(xp, w_hh, hs, cs, gates, lengths)
    assert hs.shape == cs.shape == (T + 1, B, H) and xp.shape == (T, B, 4 * H) and w_hh.shape == (4 * H, H)
    assert gates is None or gates.shape == (T, B, 4 * H)
    merge = fwd_merge_c(pl, H) if merge_c is None else bool(merge_c)
    assert not (merge and pl.ll), "MERGE_C saves a barrier: not with the LL exchange"
    KP = k_pad(H)
    if merge and pl.resident:
        assert pl.BLOCK_K == KP and pl.w_chunks == 1, "the resident MERGE_C operand is phase 0's whole c row tile"
    nq = NQ_MERGED if merge else NQ
    part = _partials(pl, cs.dtype, xp.device, nq)
    # MERGE_C: c_t and o_t rows by step parity, [R, 2, 2, BLOCK_B, H]; the kernel reads only what
    # it wrote (masked loads), so not zeroed (NaN under options().poison)
    cell = _common.alloc((pl.row_blocks, 2, 2, pl.BLOCK_B, H), cs.dtype, xp.device) if merge else None
    nbar = 0 if pl.ll else BARRIERS_PER_STEP_MERGED if merge else BARRIERS_PER_STEP
    sync = None if pl.ll else _ln_sync_counter(T, pl, xp.device, nbar)
    ring = ll_ring(pl, B, H, w_hh)
    k = _ln_lstm_fwd_persistent_kernel[(pl.programs, pl.row_blocks)](
        xp, w_hh, hs, cs, gates, lengths, gw, gb, cw, cb, part, cell, sync, ring, T, B, H, float(eps),
        RESIDENT=pl.resident, FMA=fma, IEEE=ieee, UPCAST=upcast,
        BLOCK_B=pl.BLOCK_B, BLOCK_H=pl.BLOCK_H, BLOCK_K=pl.BLOCK_K, BLOCK_P=BP, NQ=nq, MERGE_C=merge,
        BLOCK_S=KP if merge else 1, EARLY=pl.early, NK=pl.w_chunks,
        **launch_opts(xp.device, pl),
    )
    record("ln_lstm_fwd", k)
    if k is not None and "ln_lstm_fwd" in LAST_LAUNCH:
        LAST_LAUNCH["ln_lstm_fwd"]["barriers_per_step"] = nbar


def bwd_stats(gates: torch.Tensor, cs: torch.Tensor, eps: float, dtype: torch.dtype, BLOCK_B: int) -> torch.Tensor:
    """[T, R, NSTAT, BLOCK_B] in ``dtype`` (R = cdiv(B, BLOCK_B); padded rows 0): per step and row,
    mean and rstd of the four pre-LN gate rows (slots 2q, 2q+1) and of c_t = cs[t+1] (slots 8, 9),
    from the saved tensors (population variance, rstd = 1 / sqrt(var + eps), eps as the kernels
    add it: kernel_eps)."""
    T, B, G = gates.shape
    H = G // 4
    R = triton.cdiv(B, BLOCK_B)
    e = kernel_eps(eps, gates.device)
    var, mean = torch.var_mean(gates.view(T, B, 4, H).to(dtype), dim=-1, correction=0)  # [T, B, 4]
    cvar, cmean = torch.var_mean(cs[1:].to(dtype), dim=-1, correction=0)  # [T, B]
    st = torch.zeros((T, R * BLOCK_B, NSTAT), dtype=dtype, device=gates.device)
    st[:, :B, 0:8:2] = mean
    st[:, :B, 1:8:2] = 1.0 / torch.sqrt(var + e)
    st[:, :B, 8] = cmean
    st[:, :B, 9] = 1.0 / torch.sqrt(cvar + e)
    return st.view(T, R, BLOCK_B, NSTAT).transpose(2, 3).contiguous()


def ln_lstm_bwd_loop(pl: Plan, gates, w_hh, cs, dout, dG, gh, gc, ln, lengths, eps, dln_out,
                     fma, ieee, upcast, merge_bwd: Optional[bool] = None) -> None:
    """All T reverse steps of the layer-norm LSTM: fills dG[:T] (dG[T] must be zero), leaves
    gh_0 in gh and dc0 in gc (both in the compute dtype), and writes the LN parameter gradients
    (summed over the rows of row block r and all steps) into row r of dln_out = (dgw [R', G],
    dgb [R', G], dcw [R', H], dcb [R', H]), R' >= R = plan.row_blocks (1 for B <= 64); rows >= R
    are left as they are, so the step path's zeroed ``parts`` summed over dim 0 afterwards give
    the gradients. dG may be the compute dtype or the storage dtype. ``merge_bwd``: the 2-barrier
    variant (True) or the 3-barrier one (False); None: Options.merge_bwd."""
    T, B, H = dout.shape
    G = 4 * H
    BP = _check_ln_plan(pl, B, H, dout.device)
    gw, gb, cw, cb = _ln_params(ln, H)
    dgw, dgb, dcw, dcb = dln_out
    _check_buffers(gates, w_hh, cs, dout, dG, gh, gc, lengths, dgw, dgb, dcw, dcb)
    assert gates.shape == (T, B, G) and dG.shape == (T + 1, B, G) and cs.shape == (T + 1, B, H)
    assert gh.shape == gc.shape == (B, H) and gh.dtype == gc.dtype and w_hh.shape == (G, H)
    for buf, n in ((dgw, G), (dgb, G), (dcw, H), (dcb, H)):
        assert buf.dim() == 2 and buf.shape[1] == n and buf.shape[0] >= pl.row_blocks and buf.dtype == gc.dtype, \
            "LN gradient buffers: [>= R, n] in the compute dtype"
    merge = (config.options().merge_bwd and not pl.ll) if merge_bwd is None else bool(merge_bwd)
    assert not (merge and pl.ll), "MERGE_BWD saves a barrier: not with the LL exchange"
    assert pl.w_chunks == 1, "the LN backward: whole-tile or streamed W_hh (plan_ln)"
    nq = NQ_BWD_MERGED if merge else NQ
    stats = bwd_stats(gates, cs, eps, gc.dtype, pl.BLOCK_B)
    part = _partials(pl, gc.dtype, dout.device, nq)
    nbar = 0 if pl.ll else BARRIERS_PER_STEP_MERGED if merge else BARRIERS_PER_STEP
    sync = None if pl.ll else _ln_sync_counter(T, pl, dout.device, nbar)
    ring = ll_ring(pl, B, G, w_hh)
    k = _ln_lstm_bwd_persistent_kernel[(pl.programs, pl.row_blocks)](
        gates, w_hh, cs, dout, dG, gh, gc, lengths, gw, gb, cw, cb, stats, part, dgw, dgb, dcw, dcb, sync, ring,
        T, B, H, RESIDENT=pl.resident, FMA=fma, IEEE=ieee, UPCAST=upcast,
        BLOCK_B=pl.BLOCK_B, BLOCK_H=pl.BLOCK_H, BLOCK_K=pl.BLOCK_K, BLOCK_P=BP, NQ=nq, NSTAT=NSTAT,
        MERGE_BWD=merge, EARLY=pl.early, **launch_opts(dout.device, pl),
    )
    record("ln_lstm_bwd", k)
    if k is not None and "ln_lstm_bwd" in LAST_LAUNCH:
        LAST_LAUNCH["ln_lstm_bwd"]["barriers_per_step"] = nbar


__all__ = ["ln_lstm_fwd_loop", "ln_lstm_bwd_loop", "bwd_stats"]
