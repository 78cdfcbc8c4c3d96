"""The layer-norm LSTM persistent kernels' @triton.jit helpers (kernels/ln_lstm_persistent.py):
each program's partial row sums of its own columns ([R, 2, BLOCK_P, NQ, BLOCK_B] in global memory,
or tagged 64-bit words with the LL exchange), their deterministic combine across the programs
(Chan's formula for mean and variance), and the pieces of the forward's MERGE_C variant and of
the backward's phases. The tests drive the combine with P > 1 partials under the interpreter.
docs/persistent.md has the phases, the partials' layout and why their reuse is safe.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import _dsigmoid, _dtanh, _sigmoid, _tanh
from .persistent import grid_barrier, ll_get, ll_put


@triton.jit
def own_stats(v, cmask, n_own):
    """(S, M2) of each row of v [BB, BH] over its valid columns (cmask; n_own of them)."""
    s = tl.sum(tl.where(cmask[None, :], v, 0.0), axis=1)
    d = tl.where(cmask[None, :], v - (s / n_own)[:, None], 0.0)
    return s, tl.sum(d * d, axis=1)


@triton.jit
def store_part(pp, pid, k, rl, val, NQ: tl.constexpr, BLOCK_B: tl.constexpr, tag=0, LL: tl.constexpr = False):
    """part[pid, k, :] = val [BLOCK_B] (padded rows included: never read for a real row). LL: as
    a tagged 64-bit word (persistent.ll_put: the fp32 value and step ``tag``) of the int64 ring
    that replaces the buffer, for the readers' load_parts(..., LL) to wait on."""
    if LL:
        ll_put(pp, (pid * NQ + k) * BLOCK_B + rl, val.to(tl.float32), tag, rl < BLOCK_B)
    else:  # (this address form, pointer plus scalar first: fewer registers in sm_90 compiles)
        tl.store(pp + (pid * NQ + k) * BLOCK_B + rl, val.to(pp.dtype.element_ty))


@triton.jit
def store_stats(pp, pid, k, rl, v, cmask, n_own, NQ: tl.constexpr, BLOCK_B: tl.constexpr, tag=0,
                LL: tl.constexpr = False):
    """This program's LayerNorm partials of v's rows (own_stats): S into slot k, M2 into k + 1."""
    s, m2 = own_stats(v, cmask, n_own)
    store_part(pp, pid, k, rl, s, NQ, BLOCK_B, tag, LL)
    store_part(pp, pid, k + 1, rl, m2, NQ, BLOCK_B, tag, LL)


@triton.jit
def store_sums(pp, pid, k, rl, v, xh, NQ: tl.constexpr, BLOCK_B: tl.constexpr, tag=0, LL: tl.constexpr = False):
    """The two row sums a LayerNorm backward needs of v over this program's columns: Σ v into
    slot k and Σ v x̂ (x̂ = xh, the normalised input) into slot k + 1."""
    store_part(pp, pid, k, rl, tl.sum(v, axis=1), NQ, BLOCK_B, tag, LL)
    store_part(pp, pid, k + 1, rl, tl.sum(v * xh, axis=1), NQ, BLOCK_B, tag, LL)


@triton.jit
def load_parts(pp, k, rl, NQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, nprog=1, tag=0,
               LL: tl.constexpr = False):
    """part[p, k, :] of every program slot p < BLOCK_P as a [BLOCK_P, BLOCK_B] tile. No masks:
    slots p >= P are zero (the launcher zeroes the buffer; no program writes them), padded rows
    only feed padded rows. Compile-time strides, so one base address serves every element of a
    thread (immediate offsets). Written by other programs: visible after the barrier's acquire
    (persistent.py's docstring); ".cg" is only a hint. LL: waits until the words of the nprog
    programs carry step ``tag`` (persistent.ll_get); slots p >= nprog, never written, read as 0
    (masked), so the tile is the same as the barrier's."""
    ps = tl.arange(0, BLOCK_P)
    if LL:
        v = ll_get(pp, ((ps * NQ + k) * BLOCK_B)[:, None] + rl[None, :], (ps < nprog)[:, None] & (rl < BLOCK_B)[None, :],
                    tag, tl.float32)
    else:
        v = tl.load(pp + ((ps * NQ + k) * BLOCK_B)[:, None] + rl[None, :], cache_modifier=".cg")
    return v


@triton.jit
def sum_parts(pp, k, rl, NQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, nprog=1, tag=0,
              LL: tl.constexpr = False):
    """Σ_p part[p, k, :]: a fixed reduction tree over the program axis (deterministic)."""
    return tl.sum(load_parts(pp, k, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL), axis=0)


@triton.jit
def block_counts(nprog, H, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """n_p, the valid columns of program p ([BLOCK_P]; 0 past the grid)."""
    ps = tl.arange(0, BLOCK_P)
    return tl.where(ps < nprog, tl.minimum(H - ps * BLOCK_H, BLOCK_H), 0)


@triton.jit
def chan_combine(s, m2, n, H):
    """Chan's parallel combine. s, m2 [BLOCK_P, BB]: per part (rows of the tile) the sum and the
    sum of squared deviations from its own mean of each row over its n [BLOCK_P] columns (n = 0:
    no part; s = m2 = 0 there), Σ n = H. Returns (mean, M2) [BB] over all H columns:
    mean = Σ s / H,  M2 = Σ (m2 + n (s/n - mean)²)."""
    mean = tl.sum(s, axis=0) / H
    nf = n.to(s.dtype)
    dm = s / tl.maximum(nf, 1.0)[:, None] - mean[None, :]
    return mean, tl.sum(m2 + nf[:, None] * (dm * dm), axis=0)


@triton.jit
def gate_stats(pp, k, cnt, H, eps, rl, NQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, nprog=1,
               tag=0, LL: tl.constexpr = False):
    """(mean, rstd) [BLOCK_B] of the LayerNorm whose partials (S, M2) sit in slots k, k+1."""
    s = load_parts(pp, k, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    m2 = load_parts(pp, k + 1, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    mean, m2 = chan_combine(s, m2, cnt, H)
    var = m2 / H
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def norm(v, mean, rstd, cmask):
    """x̂ = (v - mean) rstd per row; 0 in padded columns (as _ln_rows)."""
    return tl.where(cmask[None, :], v - mean[:, None], 0.0) * rstd[:, None]


@triton.jit
def lnback(v, xh, s1, s2, rstd, H):
    """LayerNorm backward from v = dL/dx̂ (the weight already applied), given the all-column row
    sums s1 = Σ v and s2 = Σ v x̂: rstd (v - s1/H - x̂ s2/H) (as _ln_rows_bwd)."""
    return (v - (s1 / H)[:, None] - xh * (s2 / H)[:, None]) * rstd[:, None]



@triton.jit
def param(ptr, off, cols, cmask, ACC: tl.constexpr):
    """A LayerNorm parameter slice [BLOCK_H] (read-only, tiny: loaded where used, each step,
    rather than held in registers across the whole time loop)."""
    return tl.load(ptr + off + cols, mask=cmask, other=0.0).to(ACC)


@triton.jit
def merged_h_own(cp, crl, fresh, c, go, hs_ptr, cw_ptr, cb_ptr, t64, rows, cols, cmask, mask,
                 B, H, eps, ACC: tl.constexpr, BLOCK_S: tl.constexpr):
    """MERGE_C, at step t after barrier 2t (t = T after the loop): the cell LayerNorm's mean and
    rstd of every row of the row block from the whole c_{t-1} rows in cell slot cp (every
    program's columns; two-pass over the full row as _ln_rows: the same numbers on every program,
    whatever P), then h_{t-1} = o tanh(z) on the own columns, stored to hs[t] (the output of step
    t-1: 0 where step t-1 is past the row's length, ``fresh`` False; nothing at t = 0).
    Returns (mean, rstd [BLOCK_B], the c row tile [BLOCK_B, BLOCK_S] (0 outside fresh rows and
    H columns))."""
    ks = tl.arange(0, BLOCK_S)
    km = ks < H
    c_rows = tl.load(cp + crl[:, None] + ks[None, :], mask=fresh[:, None] & km[None, :], other=0.0,
                     cache_modifier=".cg")
    mean = tl.sum(tl.where(km[None, :], c_rows, 0.0), axis=1) / H
    d = tl.where(km[None, :], c_rows - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    # own columns: c (held) is c_{t-1} itself on the fresh rows, go is o_{t-1}
    h_new = go * _tanh(norm(c, mean, rstd, cmask) * param(cw_ptr, 0, cols, cmask, ACC)[None, :]
                       + param(cb_ptr, 0, cols, cmask, ACC)[None, :])
    smask = tl.where(t64 > 0, mask, False)
    s_cur = ((t64 * B + rows) * H)[:, None] + cols[None, :]  # hs slot t
    tl.store(hs_ptr + s_cur, tl.where(fresh[:, None], h_new, 0.0).to(hs_ptr.dtype.element_ty), mask=smask)
    return mean, rstd, c_rows


@triton.jit
def h_operand(c, orow, h0row, ks, kmask, fresh, first, mean, rstd, cw_ptr, cb_ptr,
              ACC: tl.constexpr, HT: tl.constexpr, WT: tl.constexpr):
    """MERGE_C: the matmul operand h_{t-1} [BLOCK_B, len(ks)] of columns ks for every row of the
    row block, what a load of hs[t] gives: o tanh(ĉ γ_c + β_c) from the c chunk ``c`` (loaded
    masked by fresh rows) and the o rows at orow (pointers [BLOCK_B] to column 0) on the fresh
    rows; h0 (h0row, hs[0]) on the rows of ``first`` (t = 0: every row); 0 on the others (step
    t-1 past the row's end: hs[t] is that step's output, 0); rounded to hs's dtype, then
    W_hh's. The same operations as merged_h_own's on the own columns, so the same values."""
    fm = fresh[:, None] & kmask[None, :]
    o = tl.load(orow[:, None] + ks[None, :], mask=fm, other=0.0, cache_modifier=".cg")
    h = o * _tanh(norm(c, mean, rstd, kmask) * param(cw_ptr, 0, ks, kmask, ACC)[None, :]
                  + param(cb_ptr, 0, ks, kmask, ACC)[None, :])
    hp = tl.load(h0row[:, None] + ks[None, :], mask=first[:, None] & kmask[None, :], other=0.0)
    return tl.where(fresh[:, None], h.to(HT), hp.to(HT)).to(WT)



@triton.jit
def acc_cols(ptr, val, amask, cmask):
    """*ptr += val over the valid columns (cmask); the old value counts as 0 where amask is
    False (the first step)."""
    old = tl.load(ptr, mask=amask, other=0.0)
    tl.store(ptr, (old + val).to(ptr.dtype.element_ty), mask=cmask)


@triton.jit
def load_stat(st_ptr, k, rl, NSTAT: tl.constexpr, BLOCK_B: tl.constexpr):
    """stats[t, r, k, :] of this step and row block (st_ptr points at [t, r]); padded rows 0."""
    return tl.load(st_ptr + k * BLOCK_B + rl)


@triton.jit
def ifg(st, a_i, a_f, a_g, gw_ptr, gb_ptr, cols, cmask, rl, H, ACC: tl.constexpr, NSTAT: tl.constexpr,
        BLOCK_B: tl.constexpr):
    """MERGE_BWD: the i, f, g gates of step t on the own columns from their pre-LN values and
    this step's statistics: (gi, gf, gg, x̂_i, x̂_f, x̂_g, rstd_i, rstd_f, rstd_g)."""
    r_i = load_stat(st, 1, rl, NSTAT, BLOCK_B)
    r_f = load_stat(st, 3, rl, NSTAT, BLOCK_B)
    r_g = load_stat(st, 5, rl, NSTAT, BLOCK_B)
    xh_i = norm(a_i.to(ACC), load_stat(st, 0, rl, NSTAT, BLOCK_B), r_i, cmask)
    xh_f = norm(a_f.to(ACC), load_stat(st, 2, rl, NSTAT, BLOCK_B), r_f, cmask)
    xh_g = norm(a_g.to(ACC), load_stat(st, 4, rl, NSTAT, BLOCK_B), r_g, cmask)
    gi = _sigmoid(xh_i * param(gw_ptr, 0, cols, cmask, ACC)[None, :] + param(gb_ptr, 0, cols, cmask, ACC)[None, :])
    gf = _sigmoid(xh_f * param(gw_ptr, H, cols, cmask, ACC)[None, :] + param(gb_ptr, H, cols, cmask, ACC)[None, :])
    gg = _tanh(xh_g * param(gw_ptr, 2 * H, cols, cmask, ACC)[None, :]
               + param(gb_ptr, 2 * H, cols, cmask, ACC)[None, :])
    return gi, gf, gg, xh_i, xh_f, xh_g, r_i, r_f, r_g


@triton.jit
def merged_sums(pp, pid, k, P, chat, E, xh, rl, NQ: tl.constexpr, BLOCK_B: tl.constexpr):
    """MERGE_BWD, phase 1: for a gate with v = dc E (E = dy / dc times γ, local) and
    dc = P - (r_c / H)(S1 + ĉ S2), the six local row sums from which the combine gets Σ v and
    Σ v x̂ once S1, S2 are known: slots k .. k+5 = Σ P E, Σ E, Σ ĉ E, Σ P E x̂, Σ E x̂, Σ ĉ E x̂."""
    Ex = E * xh
    store_part(pp, pid, k, rl, tl.sum(P * E, axis=1), NQ, BLOCK_B)
    store_part(pp, pid, k + 1, rl, tl.sum(E, axis=1), NQ, BLOCK_B)
    store_part(pp, pid, k + 2, rl, tl.sum(chat * E, axis=1), NQ, BLOCK_B)
    store_part(pp, pid, k + 3, rl, tl.sum(P * Ex, axis=1), NQ, BLOCK_B)
    store_part(pp, pid, k + 4, rl, tl.sum(Ex, axis=1), NQ, BLOCK_B)
    store_part(pp, pid, k + 5, rl, tl.sum(chat * Ex, axis=1), NQ, BLOCK_B)


@triton.jit
def merged_dg(pp, k, dc, F, xh, r, s1, s2, kc, gw_ptr, goff, pg, pgb, dgp, amask, cols, cmask, mask, rl, H,
              ACC: tl.constexpr, NQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """MERGE_BWD, phase 2, one of the gates i, f, g (gate offset goff = q H): dy = dc F,
    v = dy γ; Σ v and Σ v x̂ from the six sums at slots k.. (merged_sums) and the c sums s1, s2
    (kc = rstd_c / H); dG of the gate to dgp + goff; the LN parameter gradients accumulated."""
    sv = sum_parts(pp, k, rl, NQ, BLOCK_B, BLOCK_P) - kc * (
        s1 * sum_parts(pp, k + 1, rl, NQ, BLOCK_B, BLOCK_P) + s2 * sum_parts(pp, k + 2, rl, NQ, BLOCK_B, BLOCK_P))
    svx = sum_parts(pp, k + 3, rl, NQ, BLOCK_B, BLOCK_P) - kc * (
        s1 * sum_parts(pp, k + 4, rl, NQ, BLOCK_B, BLOCK_P) + s2 * sum_parts(pp, k + 5, rl, NQ, BLOCK_B, BLOCK_P))
    dy = dc * F
    v = dy * param(gw_ptr, goff, cols, cmask, ACC)[None, :]
    tl.store(dgp + goff, lnback(v, xh, sv, svx, r, H).to(dgp.dtype.element_ty), mask=mask)
    acc_cols(pg + goff, tl.sum(dy * xh, axis=0), amask, cmask)
    acc_cols(pgb + goff, tl.sum(dy, axis=0), amask, cmask)



@triton.jit
def put_dg(dgp, ring_ptr, r_off, v, tag, mask, LL: tl.constexpr, WT: tl.constexpr):
    """One gate's dG_t tile v into dG (dgp: its addresses; dG's dtype) and, with LL, first into the
    ring at r_off as tagged words (what a load of dG gives, in W_hh's dtype WT)."""
    d = v.to(dgp.dtype.element_ty)
    if LL:
        ll_put(ring_ptr, r_off, d.to(WT), tag, mask)
    tl.store(dgp, d, mask=mask)


@triton.jit
def ln_bwd_phases23(pp, pid, rl, st, dc, u, chat, r_c, v_o, xh_o, r_o, a_i, a_f, a_g, c_prev, vm, valid, gc,
                    gw_ptr, gb_ptr, pg, pgb, dg_ptr, amask, cols, cmask, mask, rows, t64, B, H, G, sync_ptr, target,
                    ring_ptr, nprog, tag, ACC: tl.constexpr, NQ: tl.constexpr, NSTAT: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, LL: tl.constexpr, WT: tl.constexpr):
    """The 3-barrier backward's phases 2 and 3 (kernels/ln_lstm_persistent.py), between its barriers 3i+1 and
    3i+3 (``target`` = barrier 3i+2); with LL no barrier: the partials carry ``tag`` (the step
    count i) and dG_t goes to the ring (slot t % 2, tag t) as well. Returns (gc_{t-1}, the dG
    offsets of step t)."""
    # ---- phase 2: dc through the cell LayerNorm; dG_o; dy of i, f, g and their row sums
    s1 = sum_parts(pp, 0, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = sum_parts(pp, 1, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    dc += lnback(u, chat, s1, s2, r_c, H)
    s1 = sum_parts(pp, 2, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = sum_parts(pp, 3, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    g_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]
    r_off = (((t64 % 2) * B + rows) * G)[:, None] + cols[None, :]  # dG_t in the LL ring
    put_dg(dg_ptr + g_off + 3 * H, ring_ptr, r_off + 3 * H, lnback(v_o, xh_o, s1, s2, r_o, H), t64, mask, LL, WT)

    gi, gf, gg, xh_i, xh_f, xh_g, r_i, r_f, r_g = ifg(st, a_i, a_f, a_g, gw_ptr, gb_ptr, cols, cmask, rl, H, ACC,
                                                      NSTAT, BLOCK_B)
    gw_i = param(gw_ptr, 0, cols, cmask, ACC)
    gw_f = param(gw_ptr, H, cols, cmask, ACC)
    gw_g = param(gw_ptr, 2 * H, cols, cmask, ACC)
    dy_i = tl.where(vm, dc * gg * _dsigmoid(gi), 0.0)
    dy_f = tl.where(vm, dc * c_prev.to(ACC) * _dsigmoid(gf), 0.0)
    dy_g = tl.where(vm, dc * gi * _dtanh(gg), 0.0)
    gc = tl.where(valid, dc * gf, gc)
    v_i = dy_i * gw_i[None, :]
    v_f = dy_f * gw_f[None, :]
    v_g = dy_g * gw_g[None, :]
    store_sums(pp, pid, 4, rl, v_i, xh_i, NQ, BLOCK_B, tag, LL)
    store_sums(pp, pid, 6, rl, v_f, xh_f, NQ, BLOCK_B, tag, LL)
    store_sums(pp, pid, 8, rl, v_g, xh_g, NQ, BLOCK_B, tag, LL)
    acc_cols(pg, tl.sum(dy_i * xh_i, axis=0), amask, cmask)
    acc_cols(pg + H, tl.sum(dy_f * xh_f, axis=0), amask, cmask)
    acc_cols(pg + 2 * H, tl.sum(dy_g * xh_g, axis=0), amask, cmask)
    acc_cols(pgb, tl.sum(dy_i, axis=0), amask, cmask)
    acc_cols(pgb + H, tl.sum(dy_f, axis=0), amask, cmask)
    acc_cols(pgb + 2 * H, tl.sum(dy_g, axis=0), amask, cmask)
    if not LL:
        grid_barrier(sync_ptr, target)

    # ---- phase 3: dG of i, f, g; publish
    s1 = sum_parts(pp, 4, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = sum_parts(pp, 5, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    put_dg(dg_ptr + g_off, ring_ptr, r_off, lnback(v_i, xh_i, s1, s2, r_i, H), t64, mask, LL, WT)
    s1 = sum_parts(pp, 6, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = sum_parts(pp, 7, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    put_dg(dg_ptr + g_off + H, ring_ptr, r_off + H, lnback(v_f, xh_f, s1, s2, r_f, H), t64, mask, LL, WT)
    s1 = sum_parts(pp, 8, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = sum_parts(pp, 9, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    put_dg(dg_ptr + g_off + 2 * H, ring_ptr, r_off + 2 * H, lnback(v_g, xh_g, s1, s2, r_g, H), t64, mask, LL, WT)
    return gc, g_off
