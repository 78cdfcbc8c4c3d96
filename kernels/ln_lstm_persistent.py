"""Persistent kernels for the layer-norm LSTM: one launch runs all T steps of one layer, forward
or backward, as kernels/persistent.py does for the plain LSTM.

NOT RUN ON A GPU YET. Written and tested on a CPU machine only: under the Triton interpreter (one
program per row block covering all of H, so every cross-program reduction runs with P = 1), the
combine helpers driven with P > 1 partials by small test kernels, and sm_90 compiles (registers,
spills; see _ln_num_warps). The multi-program path (P > 1 programs meeting at grid barriers) has
never executed; tests/test_persistent_ln.py has CUDA tests for it, for a GPU session.

Legend
    T   time steps                 B   batch rows (row blocks of BLOCK_B <= 64 rows; R of them)
    H   hidden units               G   = 4H gate pre-activations (gate order i, f, g, o)
    P   programs per row block     BH  = BLOCK_H hidden units (columns j) per program
    a_q the pre-LN gate pre-activations (q = i, f, g, o), x̂_q = (a_q - mean_q) rstd_q,
        y_q = x̂_q γ_q + β_q; ĉ = (c_t - mean_c) rstd_c, z = ĉ γ_c + β_c, h_t = o tanh(z)
    S, M2   a row's sum over some columns, and its sum of squared deviations from their mean
Buffers are kernels/lstm.py's (its launchers allocate them): hs, cs [T+1, B, H], out [T, B, H],
gates [T, B, G] (pre-LN), dG [T+1, B, G] (slot T zero), gh, gc [B, H]. Compute dtype = cs's
(forward) / gc's (backward) element type, fp32 or fp64; every load is cast to it and every store
to the destination's element type, so hs and dG may be the compute or the 16-bit storage dtype.

Why these kernels differ from persistent.py's: a program owns BH columns of all four gates for
all rows of its row block, but each LayerNorm (one per gate over H, one over c_t) needs
statistics over all H columns of a row. Each program writes "partials" for its own columns to
global memory, and after a grid barrier every program reads all P of them and combines them in
the same fixed order (deterministic, no atomics on data).

Forward, step t, program p (grid (P, R); rows never mix, so each row block has its own barrier
counter and partials). Two variants, picked by the constexpr MERGE_C (fwd_merge_c: the 2-barrier
one where BLOCK_B x K_pad <= MERGE_C_MAX_ROW_ELEMS, K_pad = next_pow2(H); see there and below).
Without MERGE_C, 3 grid barriers per step:
    1. a_q = xp_q[t] + h_{t-1} W_qᵀ on its slice (resident or streamed W_hh, as persistent.py);
       store a into gates[t]; per row and gate (S_q, M2_q) over own columns -> slots 0..7.
       BARRIER 3t+1.
    2. Combine (Chan's formula, _chan_combine) -> mean_q, rstd_q; y_q, activations;
       c_t = f c_{t-1} + i g (c in registers); (S_c, M2_c) of c_t over own columns -> slots 8, 9.
       BARRIER 3t+2.
    3. Combine -> mean_c, rstd_c; h_t = o tanh(z); store hs[t+1] (the output: zero past a
       sequence's end) and cs[t+1] (c held there), as the step kernel; prefetch the own xp tiles
       of step t+1.  BARRIER 3t+3 (h_t published).
With MERGE_C, 2 grid barriers per step (UNMEASURED on a GPU: written and tested on a CPU machine
only, like the rest of this module); the c LayerNorm and h_t move to the start of the next step:
    0. (t > 0) Read the whole c_{t-1} and o_{t-1} rows [BLOCK_B, H] of the row block from the
       "cell" buffer (every program's columns, published in phase 2 of step t-1). Each program
       computes the c statistics of every row itself: two-pass mean / var over the full row
       (_ln_rows's operations: the same numbers on every program, deterministic, independent of
       P; the 3-barrier variant's Chan combine of P partials rounds differently for P > 1,
       identically for P = 1). Then h_{t-1} = o tanh(z): on the own columns, stored to hs[t]
       (zero where step t-1 is past the row's length, as the step kernel); and for the whole
       row block as the matmul operand (_h_operand): rows whose step t-1 is valid from c, o as
       above; the others are what hs[t] holds for them without reading it (the other programs
       write its other columns in this same phase, see Hazards): h0 at t = 0, else 0 (the
       output of a step past the row's end); rounded to hs's dtype and then W_hh's, exactly
       what the 3-barrier variant's load of hs[t] gives. The own
       columns and the rebuilt rows come from the same operations on the same values (c is
       stored to the cell buffer in the compute dtype), so the operand equals hs[t] (bitwise
       under the interpreter, where the tests compare both variants; on sm_90 assumed: the
       compiler is free to contract the two copies of the expression differently).
    1. As above (slots 0..7 only; NQ_MERGED = 8).  BARRIER 2t+1.
    2. Combine -> y_q, activations, c_t; store cs[t+1] (held c) and the own columns of c_t (not
       held: what h_t is made of) and o_t into cell slot t % 2; prefetch the own xp tiles of
       step t+1.  BARRIER 2t+2 (c_t, o_t published).
    After the loop (after barrier 2T), phase 0's first half for t = T: hs[T] (no operand to
    rebuild). The streamed-W_hh path (fp64, fp32 without TF32) rebuilds the operand
    chunk by chunk in its K loop (c and o re-read by BLOCK_K columns); the resident path uses
    phase 0's c tile directly (BLOCK_S = BLOCK_K = K_pad).
Backward, reverse step t (i = T-1-t); 3 grid barriers per step. Before the launch the launcher
computes with torch, from the saved gates and cs, each step's and row's mean and rstd of the four
gate rows and of c_t = cs[t+1] (bwd_stats: [T, R, 10, BLOCK_B]), as the step kernel recomputes
them; no barrier is spent on them. Per step:
    1. carry = dG_{t+1} W_hh on own columns; gh, dh, dc as in persistent.py's LSTM backward;
       dz = valid dh o (1 - tanh² z), u = dz γ_c; dy_o = valid dh tanh(z) o (1 - o),
       v_o = dy_o γ_o; row sums over own columns of u, u ĉ, v_o, v_o x̂_o -> slots 0..3.
       BARRIER 3i+1.
    2. Combine (plain sums) -> dc = valid gc + LNback_c(u); dG_o = rstd_o (v_o - Σv_o/H
       - x̂_o Σ(v_o x̂_o)/H) into dG[t]; dy_i, dy_f, dy_g; gc_{t-1}; v_q = dy_q γ_q and row sums of
       v_q, v_q x̂_q (q = i, f, g) -> slots 4..9.  BARRIER 3i+2.
    3. Combine -> dG_i, dG_f, dG_g into dG[t]; prefetch step t-1's own tiles (gates, dout, cs).
       BARRIER 3i+3 (dG_t published).
    LN parameter gradients of the own columns (dγ_q += dy_q x̂_q, dβ_q += dy_q, dγ_c += dz ĉ,
    dβ_c += dz, summed over the block's rows; dy, dz zero where not valid, as the step kernel) are
    accumulated in row r of the caller's [R', G] / [R', H] buffers, read-modify-write once a step
    by the only program that owns those columns (the first step's read skipped).
Fewer barriers? Each step has three dependent all-column reductions (forward: gate statistics ->
c statistics -> h_t, which every program needs whole for the next matmul; backward: dG_{t+1} W_hh
-> the c LayerNorm's sums -> the gates' sums -> dG_t). The forward's MERGE_C variant merges the
last two by having every program rebuild all of h_t from published c_t and o_t rows (two
compute-dtype rows read per program and step instead of one h row, see the traffic below).
The backward's MERGE_BWD variant (2 barriers; off by default, Options.merge_bwd, until timed on a GPU)
merges its last two by linearity: dc = P - (rstd_c / H)(S1 + ĉ S2), with P = valid gc +
rstd_c u local and S1 = Σ u, S2 = Σ u ĉ the c LayerNorm's sums, so for each gate q in i, f, g
(v_q = dc E_q, E_q local) Σ v_q = Σ P E_q - (rstd_c / H)(S1 Σ E_q + S2 Σ ĉ E_q), and the same
with x̂_q inside every sum. Phase 1 stores those six local sums per gate next to S1, S2 and the o
gate's two (NQ_BWD_MERGED = 22 slots); after one barrier each program forms dc and all four
dG columns. The price: 22 partials read per row and program instead of 10 (at B64 H512, P = 32:
180 KiB a step instead of 80).

Partials: [R, 2, BLOCK_P, 10, BLOCK_B] in the compute dtype, zeroed by the launcher; program p of
row block r writes [r, s % 2, p, k, :] at step s (a step's parity picks the half: the addresses
then depend on the step, which keeps the compiler from hoisting all of them out of the time loop,
fewer registers; correctness does not need it, see below). BLOCK_P = next_pow2(P); the slots
p >= P stay zero, so every combine load is unmasked, with compile-time strides. All BLOCK_P
partials of a quantity are one [BLOCK_P, BLOCK_B] tile reduced with tl.sum: a fixed reduction
tree (plan_ln caps BLOCK_P BLOCK_B at PART_TILE_MAX_ELEMS).
Chan's formula, stored as sums: program p stores S_p (not its mean) and M2_p over its n_p valid
columns (BH; H - (P-1) BH for the last; _block_counts); mean = Σ S_p / H, M2 = Σ_p (M2_p
+ n_p (S_p/n_p - mean)²), var = M2 / H, rstd = 1/sqrt(var + eps). With P = 1 this is the step
kernel's two-pass _ln_rows exactly (S/H, Σ d², a correction term n (S/n - S/n)² = 0).
Hazards (why the buffer can be reused without extra barriers; also without the parity halves):
a region is written in phase k of a step (after barrier n-1, n = 3s+k) and read by every
program in phase k+1 (between barriers n and n+1). Its next write comes in phase k of a later
step, after barrier n+2 at the earliest, which no program passes before every program has
arrived at n+2, i.e. has finished its phase-(k+1) reads (they precede its arrival at n+1). The
two regions of a direction (fwd: slots 0..7 and 8, 9; bwd: 0..3 and 4..9) must be disjoint: a
fast program writes the second one (after barrier n) while a slow one may still read the first
(until it arrives at n+1). hs / dG slots: step t writes slot t+1 (fwd) / t (bwd) and reads
slot t / t+1, each slot read only after the barrier that follows its write and never rewritten.
MERGE_C (barrier n = 2s+k ends phase k of step s, k = 1, 2):
    partials 0..7: written in phase 1 of step s (after barrier 2s), read in phase 2 (until the
    reader arrives at 2s+2); next written in phase 1 of step s+1, after barrier 2s+2, which no
    program passes before every program has arrived there, i.e. finished those reads.
    cell slot s % 2 (c_s, o_s rows): written in phase 2 of step s (after barrier 2s+1), read in
    phase 0 and the K loop of step s+1 (after barrier 2s+2, until the reader arrives at 2s+3),
    or after the loop (s = T-1, after barrier 2T). The next write of that slot is in phase 2 of
    step s+2 (after barrier 2s+5); even a single slot would be safe: its next write, phase 2 of
    step s+1, comes after barrier 2s+3, which every reader has reached only after its reads. The
    parity halves are kept for the partials' reason (step-dependent addresses). Partials and cell
    are separate buffers: a fast program writes the cell (after 2s+1) while a slow one still
    reads the partials (until 2s+2), and writes partials (after 2s+2) while a slow one still
    reads the cell (until 2s+3).
    hs: slot u (own columns) is written in phase 0 of step u (after barrier 2u; slot T after the
    loop). The kernel reads no slot of hs but slot 0 (h0, written before the launch): step t
    cannot read slot t (the other programs write it in the same phase), and need not, as
    _h_operand knows what it holds where it does not rebuild it (h0 at t = 0, else 0).
Cross-program reads (h and dG rows, partials) are made visible by the barrier's acquire (an L1
invalidation on sm_90; see persistent.py), not by their ".cg" hint.

Barriers: persistent.grid_barrier on a per-launch zeroed int32 counter per row block; barrier n
waits for n P arrivals, so 3 T P (2 T P with MERGE_C) < 2**31 (checked). Deadlock guard and
cooperative launch as persistent.py's (check_plan, launch_opts). With Plan.early
(Options.early_arrive) a step's first barrier is split around the gates' store (only the
backward reads them) and its last one around the stores of c (the backward's) and the loads of
the next step's own tiles: arrive, that traffic, wait.

LL exchange (Options.ll_sync / Plan.ll; UNMEASURED, off by default like the plain kernels'):
no barrier at all. The 3-barrier variants' three exchanges a step each become flag-in-data
exchanges (persistent.ll_put / ll_get): the partials go out as 64-bit words (the fp32 value and
the step's tag) into an int64 buffer of the same layout, filled with -1, and a reader waits until
the words of the P programs carry the step (slots p >= P masked to 0: the same tile, the same
combine, so the results are the barrier variants' bit for bit under the interpreter); h_t
(forward) and dG_t (backward) go out as the plain kernels' ring words ([2, B, H] / [2, B, G]).
Never with MERGE_C or MERGE_BWD (the barriers they save are gone). Reuse: the partials keep
their step-parity halves, tag = the step (forward t, backward i); a program writes the half of
step s + 2 only after reading every program's row of step s + 1, which each wrote after its
reads of step s's partials ended (the same argument as the plain ring's, see ll_put). plan_ln
takes it where persistent.plan() does and ln_ll_fits allows (sm_90 compiles: B16 and 16-bit only,
the forward with its W_hh tile whole: S1 both ways, S4's backward); the barrier plan elsewhere.
What it should save: 2-3 barriers a step (~0.85 us each with 16 programs, ANCHORS), for polls
of 10 x BLOCK_P x BLOCK_B 64-bit words (B16 H256: 20 KiB a step instead of 10 KiB of partials).

Extra L2 traffic per program per step over the plain persistent LSTM (fp32 partials; the plain
kernel reads one h / dG row block per step: B H (fwd), 4 B H (bwd) elements): partial reads
10 BLOCK_P BLOCK_B 4 bytes a direction (padding slots included), writes 40 BLOCK_B bytes;
    B16 H256, P = 16:  10 KiB read, 0.6 KiB written   (an fp32 h row block: 16 KiB)
    B64 H512, P = 32:  80 KiB read, 2.5 KiB written   (an fp32 h row block: 128 KiB)
    B16 H768, P = 48:  40 KiB read (BLOCK_P = 64), 0.6 KiB written
The backward also reads 40 BLOCK_B bytes of statistics and read-modify-writes 10 BH values of
LN gradients per program and step, and the launcher's torch pass reads gates and cs once.
Forward with MERGE_C, per program and step (fp32 compute dtype): the c_t and o_t rows of its
row block, 2 BLOCK_B H 4 bytes read, replace the h row (BLOCK_B H x 2 or 4 bytes: hs's dtype;
ended rows still read theirs, from hs[t-1]); the partials no longer carry c (8 BLOCK_P BLOCK_B
4 bytes read, 32 BLOCK_B written); the own columns of c_t and o_t, 8 BLOCK_B BH bytes, are
written; the whole γ_c, β_c rows (2 H parameter elements) are read instead of BH of each:
    B16 H256, P = 16:  32 KiB c, o rows + 8 KiB partials read (3 barriers: 16 KiB fp32 / 8 KiB
                       bf16 h row + 10 KiB partials); 2.5 KiB written (0.6 KiB)
    B64 H64,  P = 4:   32 KiB rows + 8 KiB partials read (16 / 8 KiB h row + 10 KiB)
    B16 H128, P = 8:   16 KiB rows + 4 KiB partials read (8 / 4 KiB h row + 5 KiB)
i.e. 0.2-0.35 MiB more L2 reads per step and row block at B16 H256 (P = 16), bought for one
barrier a step (~0.85 us on an H100 by others' measurement). Not chosen at B16 H768 (P = 48,
4.5 MiB of c, o rows a step vs 1.1-2.3 MiB of h rows; the tiles also spill there).
UNMEASURED on a GPU.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from . import _common, config
from ._common import (
    _dsigmoid, _dtanh, _gate_chunk_dots, _gate_tile_dots, _load_gates, _sigmoid, _store_gates, _tanh, _tile,
)
from .lstm_persistent import lstm_bwd_carry
from .persistent import (
    LAST_LAUNCH, Plan, barrier_arrive, barrier_finish, block_p, check_plan, fwd_merge_c, grid_barrier, k_pad,
    launch_opts, ll_get, ll_put, ll_ring, record, row_chunk, w_tiles_bwd, w_tiles_fwd,
)

# partial slots per (program, row); statistic slots per (step, row) in the backward
NQ = 10
NQ_MERGED = 8  # the forward with MERGE_C: no partials of c_t (slots 0..7 only)
NSTAT = 10
BARRIERS_PER_STEP = 3  # the backward, and the forward without MERGE_C
BARRIERS_PER_STEP_MERGED = 2  # the forward with MERGE_C
# The backward's 2-barrier variant (MERGE_BWD, see the module docstring; Options.merge_bwd): one
# reduction round a step instead of two, NQ_BWD_MERGED partial sums a row instead of NQ. Off until
# a GPU session times it against the 3-barrier backward (bench/persistent_tune.py does): at B64
# H512 it reads 22 x 32 x 64 x 4 B = 180 KiB of partials per program and step instead of 80 KiB.
NQ_BWD_MERGED = 22


# ----------------------------------------------------------------------------------------------
# Combine helpers (also driven directly by the tests with P > 1 partials under the interpreter)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _own_stats(v, cmask, n_own):
    """(S, M2) of each row of v [BB, BH] over its valid columns (cmask; n_own of them)."""
    s = tl.sum(tl.where(cmask[None, :], v, 0.0), axis=1)
    d = tl.where(cmask[None, :], v - (s / n_own)[:, None], 0.0)
    return s, tl.sum(d * d, axis=1)


@triton.jit
def _store_part(pp, pid, k, rl, val, NQ: tl.constexpr, BLOCK_B: tl.constexpr, tag=0, LL: tl.constexpr = False):
    """part[pid, k, :] = val [BLOCK_B] (padded rows included: never read for a real row). LL: as
    a tagged 64-bit word (persistent.ll_put: the fp32 value and step ``tag``) of the int64 ring
    that replaces the buffer, for the readers' _load_parts(..., LL) to wait on."""
    if LL:
        ll_put(pp, (pid * NQ + k) * BLOCK_B + rl, val.to(tl.float32), tag, rl < BLOCK_B)
    else:  # (this address form, pointer plus scalar first: fewer registers in sm_90 compiles)
        tl.store(pp + (pid * NQ + k) * BLOCK_B + rl, val.to(pp.dtype.element_ty))


@triton.jit
def _store_stats(pp, pid, k, rl, v, cmask, n_own, NQ: tl.constexpr, BLOCK_B: tl.constexpr, tag=0,
                 LL: tl.constexpr = False):
    """This program's LayerNorm partials of v's rows (_own_stats): S into slot k, M2 into k + 1."""
    s, m2 = _own_stats(v, cmask, n_own)
    _store_part(pp, pid, k, rl, s, NQ, BLOCK_B, tag, LL)
    _store_part(pp, pid, k + 1, rl, m2, NQ, BLOCK_B, tag, LL)


@triton.jit
def _store_sums(pp, pid, k, rl, v, xh, NQ: tl.constexpr, BLOCK_B: tl.constexpr, tag=0, LL: tl.constexpr = False):
    """The two row sums a LayerNorm backward needs of v over this program's columns: Σ v into
    slot k and Σ v x̂ (x̂ = xh, the normalised input) into slot k + 1."""
    _store_part(pp, pid, k, rl, tl.sum(v, axis=1), NQ, BLOCK_B, tag, LL)
    _store_part(pp, pid, k + 1, rl, tl.sum(v * xh, axis=1), NQ, BLOCK_B, tag, LL)


@triton.jit
def _load_parts(pp, k, rl, NQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, nprog=1, tag=0,
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
def _sum_parts(pp, k, rl, NQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, nprog=1, tag=0,
               LL: tl.constexpr = False):
    """Σ_p part[p, k, :]: a fixed reduction tree over the program axis (deterministic)."""
    return tl.sum(_load_parts(pp, k, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL), axis=0)


@triton.jit
def _block_counts(nprog, H, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """n_p, the valid columns of program p ([BLOCK_P]; 0 past the grid)."""
    ps = tl.arange(0, BLOCK_P)
    return tl.where(ps < nprog, tl.minimum(H - ps * BLOCK_H, BLOCK_H), 0)


@triton.jit
def _chan_combine(s, m2, n, H):
    """Chan's parallel combine. s, m2 [BLOCK_P, BB]: per part (rows of the tile) the sum and the
    sum of squared deviations from its own mean of each row over its n [BLOCK_P] columns (n = 0:
    no part; s = m2 = 0 there), Σ n = H. Returns (mean, M2) [BB] over all H columns:
    mean = Σ s / H,  M2 = Σ (m2 + n (s/n - mean)²)."""
    mean = tl.sum(s, axis=0) / H
    nf = n.to(s.dtype)
    dm = s / tl.maximum(nf, 1.0)[:, None] - mean[None, :]
    return mean, tl.sum(m2 + nf[:, None] * (dm * dm), axis=0)


@triton.jit
def _gate_stats(pp, k, cnt, H, eps, rl, NQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, nprog=1,
                tag=0, LL: tl.constexpr = False):
    """(mean, rstd) [BLOCK_B] of the LayerNorm whose partials (S, M2) sit in slots k, k+1."""
    s = _load_parts(pp, k, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    m2 = _load_parts(pp, k + 1, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    mean, m2 = _chan_combine(s, m2, cnt, H)
    var = m2 / H
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _norm(v, mean, rstd, cmask):
    """x̂ = (v - mean) rstd per row; 0 in padded columns (as _ln_rows)."""
    return tl.where(cmask[None, :], v - mean[:, None], 0.0) * rstd[:, None]


@triton.jit
def _lnback(v, xh, s1, s2, rstd, H):
    """LayerNorm backward from v = dL/dx̂ (the weight already applied), given the all-column row
    sums s1 = Σ v and s2 = Σ v x̂: rstd (v - s1/H - x̂ s2/H) (as _ln_rows_bwd)."""
    return (v - (s1 / H)[:, None] - xh * (s2 / H)[:, None]) * rstd[:, None]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _param(ptr, off, cols, cmask, ACC: tl.constexpr):
    """A LayerNorm parameter slice [BLOCK_H] (read-only, tiny: loaded where used, each step,
    rather than held in registers across the whole time loop)."""
    return tl.load(ptr + off + cols, mask=cmask, other=0.0).to(ACC)


@triton.jit
def _merged_h_own(cp, crl, fresh, c, go, hs_ptr, cw_ptr, cb_ptr, t64, rows, cols, cmask, mask,
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
    h_new = go * _tanh(_norm(c, mean, rstd, cmask) * _param(cw_ptr, 0, cols, cmask, ACC)[None, :]
                       + _param(cb_ptr, 0, cols, cmask, ACC)[None, :])
    smask = tl.where(t64 > 0, mask, False)
    s_cur = ((t64 * B + rows) * H)[:, None] + cols[None, :]  # hs slot t
    tl.store(hs_ptr + s_cur, tl.where(fresh[:, None], h_new, 0.0).to(hs_ptr.dtype.element_ty), mask=smask)
    return mean, rstd, c_rows


@triton.jit
def _h_operand(c, orow, h0row, ks, kmask, fresh, first, mean, rstd, cw_ptr, cb_ptr,
               ACC: tl.constexpr, HT: tl.constexpr, WT: tl.constexpr):
    """MERGE_C: the matmul operand h_{t-1} [BLOCK_B, len(ks)] of columns ks for every row of the
    row block, what a load of hs[t] gives: o tanh(ĉ γ_c + β_c) from the c chunk ``c`` (loaded
    masked by fresh rows) and the o rows at orow (pointers [BLOCK_B] to column 0) on the fresh
    rows; h0 (h0row, hs[0]) on the rows of ``first`` (t = 0: every row); 0 on the others (step
    t-1 past the row's end: hs[t] is that step's output, 0); rounded to hs's dtype, then
    W_hh's. The same operations as _merged_h_own's on the own columns, so the same values."""
    fm = fresh[:, None] & kmask[None, :]
    o = tl.load(orow[:, None] + ks[None, :], mask=fm, other=0.0, cache_modifier=".cg")
    h = o * _tanh(_norm(c, mean, rstd, kmask) * _param(cw_ptr, 0, ks, kmask, ACC)[None, :]
                  + _param(cb_ptr, 0, ks, kmask, ACC)[None, :])
    hp = tl.load(h0row[:, None] + ks[None, :], mask=first[:, None] & kmask[None, :], other=0.0)
    return tl.where(fresh[:, None], h.to(HT), hp.to(HT)).to(WT)


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
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid_b = tl.program_id(1)  # the row block
    rows, cols, rmask, cmask, mask = _tile(pid_b, pid, B, H, BLOCK_B, BLOCK_H)
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
    cnt = _block_counts(nprog, H, BLOCK_H, BLOCK_P)
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
        # registers in sm_90 compiles; not needed for correctness, see the module docstring)
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
            m_c, r_c, c_rows = _merged_h_own(cp, crl, fresh, c, go, hs_ptr, cw_ptr, cb_ptr,
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
                    hk = _h_operand(c_rows, cp + BLOCK_B * H + crl, hs_ptr + h0_row, kr, krm, fresh, first, m_c, r_c,
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
                    hk = _h_operand(ck, cp + BLOCK_B * H + crl, hs_ptr + h0_row, ks, kmask, fresh, first, m_c, r_c,
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
        _store_stats(pp, pid, 0, rl, a_i, cmask, n_own, NQ, BLOCK_B, t64, LL)
        _store_stats(pp, pid, 2, rl, a_f, cmask, n_own, NQ, BLOCK_B, t64, LL)
        _store_stats(pp, pid, 4, rl, a_g, cmask, n_own, NQ, BLOCK_B, t64, LL)
        _store_stats(pp, pid, 6, rl, a_o, cmask, n_own, NQ, BLOCK_B, t64, LL)
        if EARLY:  # arrive after the partials the others read; the gates (the backward's) after it
            barrier_arrive(sync_ptr)
        if STORE_GATES:
            _store_gates(gates_ptr, g_off, H, a_i, a_f, a_g, a_o, mask)
        if not LL:
            barrier_finish(sync_ptr, ((2 if MERGE_C else 3) * t + 1) * nprog, EARLY)

        # ---- phase 2: gate LayerNorms, the cell update; then partial statistics of c_t (3 barriers) or
        # c_t, o_t published (MERGE_C)
        mean, rstd = _gate_stats(pp, 0, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
        gi = _sigmoid(_norm(a_i, mean, rstd, cmask) * _param(gw_ptr, 0, cols, cmask, ACC)[None, :]
                      + _param(gb_ptr, 0, cols, cmask, ACC)[None, :])
        mean, rstd = _gate_stats(pp, 2, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
        gf = _sigmoid(_norm(a_f, mean, rstd, cmask) * _param(gw_ptr, H, cols, cmask, ACC)[None, :]
                      + _param(gb_ptr, H, cols, cmask, ACC)[None, :])
        mean, rstd = _gate_stats(pp, 4, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
        gg = _tanh(_norm(a_g, mean, rstd, cmask) * _param(gw_ptr, 2 * H, cols, cmask, ACC)[None, :]
                   + _param(gb_ptr, 2 * H, cols, cmask, ACC)[None, :])
        mean, rstd = _gate_stats(pp, 6, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
        go = _sigmoid(_norm(a_o, mean, rstd, cmask) * _param(gw_ptr, 3 * H, cols, cmask, ACC)[None, :]
                      + _param(gb_ptr, 3 * H, cols, cmask, ACC)[None, :])
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
            _store_stats(pp, pid, 8, rl, c_new, cmask, n_own, NQ, BLOCK_B, t64, LL)
            if not LL:
                grid_barrier(sync_ptr, (3 * t + 2) * nprog)

            # ---- phase 3: the cell LayerNorm, h_t; publish
            mean, rstd = _gate_stats(pp, 8, cnt, H, eps, rl, NQ, BLOCK_B, BLOCK_P, nprog, t64, LL)
            h_new = go * _tanh(_norm(c_new, mean, rstd, cmask) * _param(cw_ptr, 0, cols, cmask, ACC)[None, :]
                               + _param(cb_ptr, 0, cols, cmask, ACC)[None, :])
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
        _merged_h_own(cp, crl, fresh, c, go, hs_ptr, cw_ptr, cb_ptr, t64, rows, cols, cmask, mask,
                      B, H, eps, ACC, BLOCK_S)


@triton.jit
def _acc_cols(ptr, val, amask, cmask):
    """*ptr += val over the valid columns (cmask); the old value counts as 0 where amask is
    False (the first step)."""
    old = tl.load(ptr, mask=amask, other=0.0)
    tl.store(ptr, (old + val).to(ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _load_stat(st_ptr, k, rl, NSTAT: tl.constexpr, BLOCK_B: tl.constexpr):
    """stats[t, r, k, :] of this step and row block (st_ptr points at [t, r]); padded rows 0."""
    return tl.load(st_ptr + k * BLOCK_B + rl)


@triton.jit
def _ifg(st, a_i, a_f, a_g, gw_ptr, gb_ptr, cols, cmask, rl, H, ACC: tl.constexpr, NSTAT: tl.constexpr,
         BLOCK_B: tl.constexpr):
    """MERGE_BWD: the i, f, g gates of step t on the own columns from their pre-LN values and
    this step's statistics: (gi, gf, gg, x̂_i, x̂_f, x̂_g, rstd_i, rstd_f, rstd_g)."""
    r_i = _load_stat(st, 1, rl, NSTAT, BLOCK_B)
    r_f = _load_stat(st, 3, rl, NSTAT, BLOCK_B)
    r_g = _load_stat(st, 5, rl, NSTAT, BLOCK_B)
    xh_i = _norm(a_i.to(ACC), _load_stat(st, 0, rl, NSTAT, BLOCK_B), r_i, cmask)
    xh_f = _norm(a_f.to(ACC), _load_stat(st, 2, rl, NSTAT, BLOCK_B), r_f, cmask)
    xh_g = _norm(a_g.to(ACC), _load_stat(st, 4, rl, NSTAT, BLOCK_B), r_g, cmask)
    gi = _sigmoid(xh_i * _param(gw_ptr, 0, cols, cmask, ACC)[None, :] + _param(gb_ptr, 0, cols, cmask, ACC)[None, :])
    gf = _sigmoid(xh_f * _param(gw_ptr, H, cols, cmask, ACC)[None, :] + _param(gb_ptr, H, cols, cmask, ACC)[None, :])
    gg = _tanh(xh_g * _param(gw_ptr, 2 * H, cols, cmask, ACC)[None, :]
               + _param(gb_ptr, 2 * H, cols, cmask, ACC)[None, :])
    return gi, gf, gg, xh_i, xh_f, xh_g, r_i, r_f, r_g


@triton.jit
def _merged_sums(pp, pid, k, P, chat, E, xh, rl, NQ: tl.constexpr, BLOCK_B: tl.constexpr):
    """MERGE_BWD, phase 1: for a gate with v = dc E (E = dy / dc times γ, local) and
    dc = P - (r_c / H)(S1 + ĉ S2), the six local row sums from which the combine gets Σ v and
    Σ v x̂ once S1, S2 are known: slots k .. k+5 = Σ P E, Σ E, Σ ĉ E, Σ P E x̂, Σ E x̂, Σ ĉ E x̂."""
    Ex = E * xh
    _store_part(pp, pid, k, rl, tl.sum(P * E, axis=1), NQ, BLOCK_B)
    _store_part(pp, pid, k + 1, rl, tl.sum(E, axis=1), NQ, BLOCK_B)
    _store_part(pp, pid, k + 2, rl, tl.sum(chat * E, axis=1), NQ, BLOCK_B)
    _store_part(pp, pid, k + 3, rl, tl.sum(P * Ex, axis=1), NQ, BLOCK_B)
    _store_part(pp, pid, k + 4, rl, tl.sum(Ex, axis=1), NQ, BLOCK_B)
    _store_part(pp, pid, k + 5, rl, tl.sum(chat * Ex, axis=1), NQ, BLOCK_B)


@triton.jit
def _merged_dg(pp, k, dc, F, xh, r, s1, s2, kc, gw_ptr, goff, pg, pgb, dgp, amask, cols, cmask, mask, rl, H,
               ACC: tl.constexpr, NQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr):
    """MERGE_BWD, phase 2, one of the gates i, f, g (gate offset goff = q H): dy = dc F,
    v = dy γ; Σ v and Σ v x̂ from the six sums at slots k.. (_merged_sums) and the c sums s1, s2
    (kc = rstd_c / H); dG of the gate to dgp + goff; the LN parameter gradients accumulated."""
    sv = _sum_parts(pp, k, rl, NQ, BLOCK_B, BLOCK_P) - kc * (
        s1 * _sum_parts(pp, k + 1, rl, NQ, BLOCK_B, BLOCK_P) + s2 * _sum_parts(pp, k + 2, rl, NQ, BLOCK_B, BLOCK_P))
    svx = _sum_parts(pp, k + 3, rl, NQ, BLOCK_B, BLOCK_P) - kc * (
        s1 * _sum_parts(pp, k + 4, rl, NQ, BLOCK_B, BLOCK_P) + s2 * _sum_parts(pp, k + 5, rl, NQ, BLOCK_B, BLOCK_P))
    dy = dc * F
    v = dy * _param(gw_ptr, goff, cols, cmask, ACC)[None, :]
    tl.store(dgp + goff, _lnback(v, xh, sv, svx, r, H).to(dgp.dtype.element_ty), mask=mask)
    _acc_cols(pg + goff, tl.sum(dy * xh, axis=0), amask, cmask)
    _acc_cols(pgb + goff, tl.sum(dy, axis=0), amask, cmask)


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
    # LN parameter gradients of the own columns, summed over rows and steps: accumulated in row
    # r = pid_b of the [R', G] / [R', H] buffers, which only this program touches at these
    # columns (read-modify-write once per step, the read of the first step skipped: the old
    # contents count as 0). Kept in memory rather than in ten [BLOCK_H] register vectors over the
    # whole loop: the B64 H512 backward spilled with those (sm_90 compile, see _ln_num_warps).
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
        m_o = _load_stat(st, 6, rl, NSTAT, BLOCK_B)
        r_o = _load_stat(st, 7, rl, NSTAT, BLOCK_B)
        m_c = _load_stat(st, 8, rl, NSTAT, BLOCK_B)
        r_c = _load_stat(st, 9, rl, NSTAT, BLOCK_B)
        gw_o = _param(gw_ptr, 3 * H, cols, cmask, ACC)
        cw = _param(cw_ptr, 0, cols, cmask, ACC)
        # this order (tz, then go) for the registers (B16 H256 spilled 16 B, sm_90 compile)
        chat = _norm(c_cur.to(ACC), m_c, r_c, cmask)
        tz = _tanh(chat * cw[None, :] + _param(cb_ptr, 0, cols, cmask, ACC)[None, :])
        xh_o = _norm(a_o.to(ACC), m_o, r_o, cmask)
        go = _sigmoid(xh_o * gw_o[None, :] + _param(gb_ptr, 3 * H, cols, cmask, ACC)[None, :])
        dy_o = tl.where(vm, dh * tz * _dsigmoid(go), 0.0)
        dz = tl.where(vm, dh * go * _dtanh(tz), 0.0)
        u = dz * cw[None, :]
        v_o = dy_o * gw_o[None, :]
        _store_sums(pp, pid, 0, rl, u, chat, NQ, BLOCK_B, i64, LL)
        _store_sums(pp, pid, 2, rl, v_o, xh_o, NQ, BLOCK_B, i64, LL)
        _acc_cols(pcw, tl.sum(dz * chat, axis=0), amask, cmask)
        _acc_cols(pcb, tl.sum(dz, axis=0), amask, cmask)
        _acc_cols(pg + 3 * H, tl.sum(dy_o * xh_o, axis=0), amask, cmask)
        _acc_cols(pgb + 3 * H, tl.sum(dy_o, axis=0), amask, cmask)
        if MERGE_BWD:
            # dc = P - (r_c / H)(S1 + ĉ S2) with P local and S1, S2 the c sums above, so each
            # gate's sums Σ v_q, Σ v_q x̂_q (v_q = dc E_q) are combinations of local sums: all in
            # this one round (slots 4 + 6 q + 0..5)
            P = dc + r_c[:, None] * u
            gi, gf, gg, xh_i, xh_f, xh_g, r_i, r_f, r_g = _ifg(st, a_i, a_f, a_g, gw_ptr, gb_ptr, cols, cmask, rl,
                                                              H, ACC, NSTAT, BLOCK_B)
            F_i = tl.where(vm, gg * _dsigmoid(gi), 0.0)
            F_f = tl.where(vm, c_prev.to(ACC) * _dsigmoid(gf), 0.0)
            F_g = tl.where(vm, gi * _dtanh(gg), 0.0)
            _merged_sums(pp, pid, 4, P, chat, F_i * _param(gw_ptr, 0, cols, cmask, ACC)[None, :], xh_i, rl,
                         NQ, BLOCK_B)
            _merged_sums(pp, pid, 10, P, chat, F_f * _param(gw_ptr, H, cols, cmask, ACC)[None, :], xh_f, rl,
                         NQ, BLOCK_B)
            _merged_sums(pp, pid, 16, P, chat, F_g * _param(gw_ptr, 2 * H, cols, cmask, ACC)[None, :], xh_g, rl,
                         NQ, BLOCK_B)
            grid_barrier(sync_ptr, (2 * i + 1) * nprog)

            # ---- phase 2 (MERGE_BWD): dc, then dG of all four gates; publish
            s1 = _sum_parts(pp, 0, rl, NQ, BLOCK_B, BLOCK_P)
            s2 = _sum_parts(pp, 1, rl, NQ, BLOCK_B, BLOCK_P)
            kc = r_c / H
            dc = P - kc[:, None] * (s1[:, None] + chat * s2[:, None])
            dgty = dg_ptr.dtype.element_ty
            g_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]
            tl.store(dg_ptr + g_off + 3 * H, _lnback(v_o, xh_o, _sum_parts(pp, 2, rl, NQ, BLOCK_B, BLOCK_P),
                                                     _sum_parts(pp, 3, rl, NQ, BLOCK_B, BLOCK_P), r_o, H).to(dgty),
                     mask=mask)
            _merged_dg(pp, 4, dc, F_i, xh_i, r_i, s1, s2, kc, gw_ptr, 0, pg, pgb, dg_ptr + g_off, amask, cols, cmask,
                       mask, rl, H, ACC, NQ, BLOCK_B, BLOCK_P)
            _merged_dg(pp, 10, dc, F_f, xh_f, r_f, s1, s2, kc, gw_ptr, H, pg, pgb, dg_ptr + g_off, amask, cols,
                       cmask, mask, rl, H, ACC, NQ, BLOCK_B, BLOCK_P)
            _merged_dg(pp, 16, dc, F_g, xh_g, r_g, s1, s2, kc, gw_ptr, 2 * H, pg, pgb, dg_ptr + g_off, amask, cols,
                       cmask, mask, rl, H, ACC, NQ, BLOCK_B, BLOCK_P)
            gc = tl.where(valid, dc * gf, gc)
        else:
            if not LL:
                grid_barrier(sync_ptr, (3 * i + 1) * nprog)
            gc, g_off = _ln_bwd_phases23(pp, pid, rl, st, dc, u, chat, r_c, v_o, xh_o, r_o, a_i, a_f, a_g, c_prev,
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


@triton.jit
def _put_dg(dgp, ring_ptr, r_off, v, tag, mask, LL: tl.constexpr, WT: tl.constexpr):
    """One gate's dG_t tile v into dG (dgp: its addresses; dG's dtype) and, with LL, first into the
    ring at r_off as tagged words (what a load of dG gives, in W_hh's dtype WT)."""
    d = v.to(dgp.dtype.element_ty)
    if LL:
        ll_put(ring_ptr, r_off, d.to(WT), tag, mask)
    tl.store(dgp, d, mask=mask)


@triton.jit
def _ln_bwd_phases23(pp, pid, rl, st, dc, u, chat, r_c, v_o, xh_o, r_o, a_i, a_f, a_g, c_prev, vm, valid, gc,
                     gw_ptr, gb_ptr, pg, pgb, dg_ptr, amask, cols, cmask, mask, rows, t64, B, H, G, sync_ptr, target,
                     ring_ptr, nprog, tag, ACC: tl.constexpr, NQ: tl.constexpr, NSTAT: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, LL: tl.constexpr, WT: tl.constexpr):
    """The 3-barrier backward's phases 2 and 3 (module docstring), between its barriers 3i+1 and
    3i+3 (``target`` = barrier 3i+2); with LL no barrier: the partials carry ``tag`` (the step
    count i) and dG_t goes to the ring (slot t % 2, tag t) as well. Returns (gc_{t-1}, the dG
    offsets of step t)."""
    # ---- phase 2: dc through the cell LayerNorm; dG_o; dy of i, f, g and their row sums
    s1 = _sum_parts(pp, 0, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = _sum_parts(pp, 1, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    dc += _lnback(u, chat, s1, s2, r_c, H)
    s1 = _sum_parts(pp, 2, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = _sum_parts(pp, 3, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    g_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]
    r_off = (((t64 % 2) * B + rows) * G)[:, None] + cols[None, :]  # dG_t in the LL ring
    _put_dg(dg_ptr + g_off + 3 * H, ring_ptr, r_off + 3 * H, _lnback(v_o, xh_o, s1, s2, r_o, H), t64, mask, LL, WT)

    gi, gf, gg, xh_i, xh_f, xh_g, r_i, r_f, r_g = _ifg(st, a_i, a_f, a_g, gw_ptr, gb_ptr, cols, cmask, rl, H, ACC,
                                                      NSTAT, BLOCK_B)
    gw_i = _param(gw_ptr, 0, cols, cmask, ACC)
    gw_f = _param(gw_ptr, H, cols, cmask, ACC)
    gw_g = _param(gw_ptr, 2 * H, cols, cmask, ACC)
    dy_i = tl.where(vm, dc * gg * _dsigmoid(gi), 0.0)
    dy_f = tl.where(vm, dc * c_prev.to(ACC) * _dsigmoid(gf), 0.0)
    dy_g = tl.where(vm, dc * gi * _dtanh(gg), 0.0)
    gc = tl.where(valid, dc * gf, gc)
    v_i = dy_i * gw_i[None, :]
    v_f = dy_f * gw_f[None, :]
    v_g = dy_g * gw_g[None, :]
    _store_sums(pp, pid, 4, rl, v_i, xh_i, NQ, BLOCK_B, tag, LL)
    _store_sums(pp, pid, 6, rl, v_f, xh_f, NQ, BLOCK_B, tag, LL)
    _store_sums(pp, pid, 8, rl, v_g, xh_g, NQ, BLOCK_B, tag, LL)
    _acc_cols(pg, tl.sum(dy_i * xh_i, axis=0), amask, cmask)
    _acc_cols(pg + H, tl.sum(dy_f * xh_f, axis=0), amask, cmask)
    _acc_cols(pg + 2 * H, tl.sum(dy_g * xh_g, axis=0), amask, cmask)
    _acc_cols(pgb, tl.sum(dy_i, axis=0), amask, cmask)
    _acc_cols(pgb + H, tl.sum(dy_f, axis=0), amask, cmask)
    _acc_cols(pgb + 2 * H, tl.sum(dy_g, axis=0), amask, cmask)
    if not LL:
        grid_barrier(sync_ptr, target)

    # ---- phase 3: dG of i, f, g; publish
    s1 = _sum_parts(pp, 4, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = _sum_parts(pp, 5, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    _put_dg(dg_ptr + g_off, ring_ptr, r_off, _lnback(v_i, xh_i, s1, s2, r_i, H), t64, mask, LL, WT)
    s1 = _sum_parts(pp, 6, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = _sum_parts(pp, 7, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    _put_dg(dg_ptr + g_off + H, ring_ptr, r_off + H, _lnback(v_f, xh_f, s1, s2, r_f, H), t64, mask, LL, WT)
    s1 = _sum_parts(pp, 8, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    s2 = _sum_parts(pp, 9, rl, NQ, BLOCK_B, BLOCK_P, nprog, tag, LL)
    _put_dg(dg_ptr + g_off + 2 * H, ring_ptr, r_off + 2 * H, _lnback(v_g, xh_g, s1, s2, r_g, H), t64, mask, LL, WT)
    return gc, g_off




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
        return float(np.float32(eps))
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
    # it wrote (masked loads), so not zeroed (NaN when kernels._common.POISON is on)
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
