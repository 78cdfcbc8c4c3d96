"""The persistent tanh / ReLU RNN: rnn_fwd_loop / rnn_bwd_loop run all T steps of one layer in one
launch (kernels/tiles.py: the plan; kernels/persistent.py: the barrier and LL exchange they share)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import _dtanh, _mm, _tanh
from .persistent import (
    barrier_arrive, barrier_finish, ll_put, plain_launch, program_tile, record, row_chunk, w_tiles,
)
from .tiles import Plan


@triton.heuristics({"HAS_LENGTHS": lambda a: a["len_ptr"] is not None, "LL": lambda a: a["ring_ptr"] is not None})
@triton.jit(do_not_specialize=["T"])
def _rnn_fwd_persistent_kernel(
    xp_ptr,  # [T, B, H] x W_ihᵀ + b_ih + b_hh, storage dtype
    w_ptr,  # [H, H] W_hh
    hs_ptr,  # [T+1, B, H] state dtype: slot 0 = h0 in, slots 1..T out
    out_ptr,  # [T, B, H] storage dtype
    len_ptr,  # [B] int64 lengths, or None
    sync_ptr,  # [row blocks] int32, zero (None with LL)
    ring_ptr,  # [2, B, H] int32 / int64 tagged h (see ll_put), all -1; or None: the barrier
    T, B, H,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, LL: tl.constexpr, SOLO: tl.constexpr,
    RESIDENT: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NK: tl.constexpr, EARLY: tl.constexpr,
):
    pid, nprog, pid_b, rows, cols, rmask, cmask, mask = program_tile(B, H, BLOCK_B, BLOCK_H)
    if not LL and not SOLO:
        sync_ptr += pid_b  # this row block's barrier counter
    ACC = hs_ptr.dtype.element_ty
    WT = w_ptr.dtype.element_ty
    zero64 = tl.zeros([], dtype=tl.int64)
    w_row = cols.to(tl.int64) * H  # W_hh row j
    if RESIDENT:  # W_hh[j, k] at [k, j], NK tiles
        kr = tl.arange(0, BLOCK_K)
        wr = w_tiles(w_ptr, w_row, 0, cmask, H, BLOCK_K, NK, False)

    b_off = (rows * H)[:, None] + cols[None, :]
    h_own = tl.load(hs_ptr + b_off, mask=mask, other=0.0)
    if LL:  # ring slot 0: this program's columns of h0, tag 0
        ll_put(ring_ptr, b_off, h_own.to(WT), zero64, mask)
    if HAS_LENGTHS:
        L = tl.load(len_ptr + rows, mask=rmask, other=0)
    x = tl.load(xp_ptr + b_off, mask=mask, other=0.0)  # step 0

    for t in range(T):
        t64 = zero64 + t
        h_row = (t64 * B + rows) * H
        r_row = ((t64 % 2) * B + rows) * H  # the same row in the LL ring
        pre = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        if RESIDENT:
            for kc in tl.static_range(NK):  # (SOLO: NK = 1)
                if SOLO:  # this program owns every column: h_{t-1} is its own, in registers; the
                    # padding columns as the barrier path reads them (0): an inf there would meet
                    # W_hh's zero rows k >= H as inf x 0 = NaN in every column
                    hk = tl.where(mask, h_own, 0.0).to(WT)
                else:
                    ks = kc * BLOCK_K + kr
                    hk = row_chunk(hs_ptr, h_row, ks, rmask[:, None] & (ks < H)[None, :], ring_ptr, r_row, t64, LL,
                                    WT)
                pre = _mm(hk, wr[kc], pre, FMA, IEEE, UPCAST)
        else:
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < H
                hk = row_chunk(hs_ptr, h_row, ks, rmask[:, None] & kmask[None, :], ring_ptr, r_row, t64, LL, WT)
                wk = tl.load(w_ptr + w_row[None, :] + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
                pre = _mm(hk, wk, pre, FMA, IEEE, UPCAST)
        pre += x.to(ACC)
        if RELU:
            h_new = tl.where(pre < 0, 0.0, pre)  # not tl.maximum: NaN must propagate as in torch.relu
        else:
            h_new = _tanh(pre)
        if HAS_LENGTHS:
            valid = (t64 < L)[:, None]
            h_own = tl.where(valid, h_new, h_own)
            out = tl.where(valid, h_new, 0.0)
        else:
            h_own = h_new
            out = h_new
        if LL:  # first, so that the others can go on: ring slot (t+1) % 2, tag t+1
            ll_put(ring_ptr, ((((t64 + 1) % 2) * B + rows) * H)[:, None] + cols[None, :], h_own.to(WT), t64 + 1,
                    mask)
        s_cur = h_row[:, None] + cols[None, :]
        tl.store(hs_ptr + s_cur + B * H, h_own, mask=mask)
        if EARLY:  # arrive now: the release then waits for the h_t stores only (Plan.early)
            barrier_arrive(sync_ptr)
        tl.store(out_ptr + s_cur, out.to(out_ptr.dtype.element_ty), mask=mask)

        x = tl.load(xp_ptr + s_cur + B * H, mask=tl.where(t + 1 < T, mask, False), other=0.0)  # step t+1
        if not LL and not SOLO:
            barrier_finish(sync_ptr, (t + 1) * nprog, EARLY)


# Reverse step t (kernels/rnn.py): gh_t = [not valid_{t+1}] gh_{t+1} + dP_{t+1} W_hh[:, j];
# dh = dout_t + gh_t;  dP_t = valid_t dh (1 − h_t²) (tanh) or valid_t dh [h_t > 0] (relu).
@triton.heuristics({"HAS_LENGTHS": lambda a: a["len_ptr"] is not None, "LL": lambda a: a["ring_ptr"] is not None})
@triton.jit(do_not_specialize=["T"])
def _rnn_bwd_persistent_kernel(
    w_ptr,  # [H, H] W_hh
    hs_ptr,  # [T+1, B, H] saved states
    dout_ptr,  # [T, B, H] storage dtype
    dp_ptr,  # [T+1, B, H] grad_dtype: slot T zero (in), slots 0..T-1 out
    gh_ptr,  # [B, H] in: dh_n, out: gh_0
    len_ptr,  # [B] int64 lengths, or None
    sync_ptr,  # [row blocks] int32, zero (None with LL)
    ring_ptr,  # [2, B, H] int32 / int64 tagged dP (see ll_put), all -1; or None: the barrier
    T, B, H,
    HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr, LL: tl.constexpr, SOLO: tl.constexpr,
    RESIDENT: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, NK: tl.constexpr, EARLY: tl.constexpr,
):
    pid, nprog, pid_b, rows, cols, rmask, cmask, mask = program_tile(B, H, BLOCK_B, BLOCK_H)
    if not LL and not SOLO:
        sync_ptr += pid_b  # this row block's barrier counter
    ACC = gh_ptr.dtype.element_ty
    WT = w_ptr.dtype.element_ty
    zero64 = tl.zeros([], dtype=tl.int64)
    if RESIDENT:  # W_hh[k, j] at [k, j], NK tiles
        kr = tl.arange(0, BLOCK_K)
        wr = w_tiles(w_ptr, cols, 0, cmask, H, BLOCK_K, NK, True)

    if HAS_LENGTHS:
        L = tl.minimum(tl.load(len_ptr + rows, mask=rmask, other=0), T)
    else:
        L = tl.zeros([BLOCK_B], dtype=tl.int64) + T
    b_off = (rows * H)[:, None] + cols[None, :]
    gh = tl.load(gh_ptr + b_off, mask=mask, other=0.0)
    t_last = zero64 + T - 1
    s_cur = ((t_last * B + rows) * H)[:, None] + cols[None, :]
    d_out = tl.load(dout_ptr + s_cur, mask=mask, other=0.0)
    h = tl.load(hs_ptr + s_cur + B * H, mask=mask, other=0.0)  # h_t = slot t+1
    if LL:  # ring slot T % 2: this program's columns of dP_T = 0, tag T
        ll_put(ring_ptr, ((((t_last + 1) % 2) * B + rows) * H)[:, None] + cols[None, :],
                tl.zeros([BLOCK_B, BLOCK_H], dtype=WT), t_last + 1, mask)
    if SOLO:  # this program owns every column: dP_{t+1} whole (dP_T = 0), in registers
        dp_op = tl.zeros([BLOCK_B, BLOCK_H], dtype=WT)

    for i in range(T):
        t64 = zero64 + (T - 1 - i)
        valid = (t64 < L)[:, None]
        nvalid = (t64 + 1 < L)[:, None]
        carry = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        dp_row = ((t64 + 1) * B + rows) * H
        r_row = (((t64 + 1) % 2) * B + rows) * H  # the same row in the LL ring
        if RESIDENT:
            for kc in tl.static_range(NK):  # (SOLO: NK = 1)
                if SOLO:
                    dpk = dp_op
                else:
                    ks = kc * BLOCK_K + kr
                    dpk = row_chunk(dp_ptr, dp_row, ks, rmask[:, None] & (ks < H)[None, :], ring_ptr, r_row, t64 + 1,
                                     LL, WT)
                carry = _mm(dpk, wr[kc], carry, FMA, IEEE, UPCAST)
        else:
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < H
                dpk = row_chunk(dp_ptr, dp_row, ks, rmask[:, None] & kmask[None, :], ring_ptr, r_row, t64 + 1, LL,
                                 WT)
                wk = tl.load(w_ptr + ks[:, None].to(tl.int64) * H + cols[None, :],
                             mask=kmask[:, None] & cmask[None, :], other=0.0)
                carry = _mm(dpk, wk, carry, FMA, IEEE, UPCAST)
        gh = tl.where(nvalid, 0.0, gh) + carry
        dh = d_out.to(ACC) + gh
        if RELU:
            dp = tl.where(h <= 0, 0.0, dh)
        else:
            dp = dh * _dtanh(h)
        dp = tl.where(valid, dp, 0.0)
        if LL:  # first, so that the others can go on: ring slot t % 2, tag t
            ll_put(ring_ptr, (((t64 % 2) * B + rows) * H)[:, None] + cols[None, :],
                    dp.to(dp_ptr.dtype.element_ty).to(WT), t64, mask)
        if SOLO:  # what dP[t] holds, as the next step's operand (0 in the padding, see the forward)
            dp_op = tl.where(mask, dp, 0.0).to(dp_ptr.dtype.element_ty).to(WT)
        s_cur = ((t64 * B + rows) * H)[:, None] + cols[None, :]
        tl.store(dp_ptr + s_cur, dp.to(dp_ptr.dtype.element_ty), mask=mask)
        if EARLY:  # arrive now: the release then waits for the dP_t stores only (Plan.early)
            barrier_arrive(sync_ptr)

        pmask = tl.where(i + 1 < T, mask, False)  # step t-1's own tiles, before the barrier's wait
        d_out = tl.load(dout_ptr + s_cur - B * H, mask=pmask, other=0.0)
        h = tl.load(hs_ptr + s_cur, mask=pmask, other=0.0)
        if not LL and not SOLO:
            barrier_finish(sync_ptr, (i + 1) * nprog, EARLY)
    tl.store(gh_ptr + b_off, gh, mask=mask)




# ----------------------------------------------------------------------------------------------
# Launchers: the time loops of kernels/rnn.py, in one launch. The callers
# allocate and own every buffer; these only check the plan and launch.
# ----------------------------------------------------------------------------------------------



def rnn_fwd_loop(pl: Plan, xp, w_hh, hs, out, lengths, relu, fma, ieee, upcast) -> None:
    """All T forward steps: fills hs[1:] and out."""
    T, B, H = out.shape
    sync, ring, opts = plain_launch(pl, T, B, H, H, w_hh, fma, ieee, upcast)
    k = _rnn_fwd_persistent_kernel[(pl.programs, pl.row_blocks)](
        xp, w_hh, hs, out, lengths, sync, ring, T, B, H, RELU=relu, **opts)
    record("rnn_fwd", k)


def rnn_bwd_loop(pl: Plan, w_hh, hs, dout, dP, gh, lengths, relu, fma, ieee, upcast) -> None:
    """All T reverse steps: fills dP[:T] (dP[T] must be zero), leaves gh_0 in gh."""
    T, B, H = dout.shape
    sync, ring, opts = plain_launch(pl, T, B, H, H, w_hh, fma, ieee, upcast)
    k = _rnn_bwd_persistent_kernel[(pl.programs, pl.row_blocks)](
        w_hh, hs, dout, dP, gh, lengths, sync, ring, T, B, H, RELU=relu, **opts)
    record("rnn_bwd", k)
