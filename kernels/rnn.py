"""Elman RNN (tanh or ReLU): the step kernels and their whole-sequence launchers.

Legend: T time steps, B batch rows, I input features, H hidden units (also the width of a
pre-activation row), K the recurrent matmul's reduction dim (H, forward and backward).
Time-major: x [T, B, I], out [T, B, H]. The saved state sequence hs is [T+1, B, H] (slot 0 =
h0, slot t+1 the carried state after step t) in the state dtype. A program owns BLOCK_B rows x
BLOCK_H hidden units.

Kernels, one launch a time step (given a persistent plan, rnn_persistent.py runs the whole loop
in one launch instead):
    rnn_fwd_kernel  FUSED: the step h_t = act(xp_t + h_{t-1} W_hhᵀ), the matmul included
                    (tl.dot); else the pointwise step from torch's matmul.
    rnn_bwd_kernel  the reverse step; FUSED fuses the carried dh = dP_{t+1} W_hh.
Nothing beyond hs is saved: both derivatives come from the output (tanh' = 1 − h²,
relu' = [h > 0]).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import config, rnn_persistent, tiles
from ._common import (
    StepLauncher, _carry_dot, _dtanh, _mm, _reverse_step_masks, _tanh, _tile, after_loop_grads, alloc, dot_flags, given,
    input_projection,
)
from .tiles import rnn_blocks, sm_count

NONLINEARITIES = ("tanh", "relu")


def unsupported(x: torch.Tensor, w_hh: torch.Tensor) -> Optional[str]:
    """Why the kernels cannot take this problem (the caller falls back to the reference), or None.
    The RNN kernels tile H and K, so there is no size limit besides empty problems."""
    if x.dtype not in config.SUPPORTED_DTYPES:
        return f"dtype {x.dtype}"
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[1]
    if T == 0 or B == 0 or H == 0:
        return f"an empty problem (T={T}, B={B}, H={H})"
    return None


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.heuristics(given(FUSED="w_ptr", HAS_LENGTHS="len_ptr"))
@triton.jit(do_not_specialize=["t"])
def rnn_fwd_kernel(
    xp_ptr,  # [T, B, H] x W_ihᵀ + b_ih + b_hh, storage dtype
    w_ptr,  # [H, H] W_hh (FUSED) or None
    mm_ptr,  # [B, H] h_{t-1} W_hhᵀ computed by torch (not FUSED) or None
    hs_ptr,  # [T+1, B, H] state dtype: reads slot t, writes slot t+1
    out_ptr,  # [T, B, H] storage dtype: writes step t
    len_ptr,  # [B] int64 lengths, or None
    t, B, H,
    FUSED: tl.constexpr, HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, cols, rmask, cmask, mask = _tile(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    ACC = hs_ptr.dtype.element_ty
    t64 = t.to(tl.int64)

    s_cur = ((t64 * B + rows) * H)[:, None] + cols[None, :]  # slot t of hs, step t of xp / out
    s_nxt = (((t64 + 1) * B + rows) * H)[:, None] + cols[None, :]

    if FUSED:
        pre = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        h_row = (t64 * B + rows) * H
        w_row = cols.to(tl.int64) * H  # W_hh row j
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            hk = tl.load(hs_ptr + h_row[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            wk = tl.load(w_ptr + w_row[None, :] + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            pre = _mm(hk.to(w_ptr.dtype.element_ty), wk, pre, FMA, IEEE, UPCAST)
    else:
        pre = tl.load(mm_ptr + (rows * H)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
    pre += tl.load(xp_ptr + s_cur, mask=mask, other=0.0).to(ACC)
    if RELU:
        h_new = tl.where(pre < 0, 0.0, pre)  # not tl.maximum: NaN must propagate as in torch.relu
    else:
        h_new = _tanh(pre)

    if HAS_LENGTHS:
        valid = (t64 < tl.load(len_ptr + rows, mask=rmask, other=0))[:, None]
        h_keep = tl.where(valid, h_new, tl.load(hs_ptr + s_cur, mask=mask, other=0.0))
        out = tl.where(valid, h_new, 0.0)
    else:
        h_keep = h_new
        out = h_new
    tl.store(hs_ptr + s_nxt, h_keep, mask=mask)
    tl.store(out_ptr + s_cur, out.to(out_ptr.dtype.element_ty), mask=mask)


# Reverse step t. valid_t = t < len; gh_t = gradient w.r.t. the carried state h_t (gh_{T-1} = dh_n);
# h_t = hs[t+1] is the cell output wherever valid_t.
#   gh_t = [not valid_{t+1}] gh_{t+1} + dP_{t+1} W_hh          (FUSED: tl.dot over K = H)
#   dh   = valid_t (dout_t + gh_t)
#   dP_t = dh (1 − h_t²)   (tanh)      or   dh [h_t > 0]   (relu, as torch's threshold_backward)
@triton.heuristics(given(FUSED="w_ptr", HAS_LENGTHS="len_ptr"))
@triton.jit(do_not_specialize=["t", "T"])
def rnn_bwd_kernel(
    w_ptr,  # [H, H] W_hh (FUSED) or None
    carry_ptr,  # [B, H] dP_{t+1} W_hh computed by torch (not FUSED) or None
    hs_ptr,  # [T+1, B, H] saved states
    dout_ptr,  # [T, B, H] storage dtype
    dp_ptr,  # [T+1, B, H] grad_dtype: reads slot t+1 (FUSED), writes slot t; slot T is zero
    gh_ptr,  # [B, H] in: gh_{t+1}, out: gh_t
    len_ptr,  # [B] int64 lengths, or None
    t, T, B, H,
    FUSED: tl.constexpr, HAS_LENGTHS: tl.constexpr, RELU: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, cols, rmask, cmask, mask = _tile(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    ACC = gh_ptr.dtype.element_ty
    t64 = t.to(tl.int64)

    valid, nvalid = _reverse_step_masks(len_ptr, rows, rmask, t64, T, HAS_LENGTHS, BLOCK_B)

    s_cur = ((t64 * B + rows) * H)[:, None] + cols[None, :]
    s_nxt = (((t64 + 1) * B + rows) * H)[:, None] + cols[None, :]
    b_off = (rows * H)[:, None] + cols[None, :]

    if FUSED:
        carry = _carry_dot(dp_ptr, w_ptr, rows, rmask, cols, cmask, t64, B, H, H, ACC, FMA, IEEE, UPCAST,
                           BLOCK_B, BLOCK_H, BLOCK_K)
    else:
        carry = tl.load(carry_ptr + b_off, mask=mask, other=0.0).to(ACC)
    gh = tl.where(nvalid, 0.0, tl.load(gh_ptr + b_off, mask=mask, other=0.0)) + carry
    tl.store(gh_ptr + b_off, gh, mask=mask)
    dh = tl.load(dout_ptr + s_cur, mask=mask, other=0.0).to(ACC) + gh
    h = tl.load(hs_ptr + s_nxt, mask=mask, other=0.0)
    if RELU:
        dp = tl.where(h <= 0, 0.0, dh)
    else:
        dp = dh * _dtanh(h)
    dp = tl.where(valid, dp, 0.0)
    tl.store(dp_ptr + s_cur, dp.to(dp_ptr.dtype.element_ty), mask=mask)




# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def persistent_plan(direction: str, B: int, H: int, fused: bool, dtype: torch.dtype, device,
                    limit: Optional[int] = None, allow_tf32: bool = False):
    """(tiles.Plan, "") when one persistent launch can run this layer's time loop in
    ``direction``, else (None, why not): kernels.lstm.persistent_plan's, for the RNN."""
    if not fused:
        return None, "the unfused step kernels were asked for"
    return tiles.plan("rnn", direction, B, H, dtype, device, limit, allow_tf32)


def _relu(nonlinearity: str) -> bool:
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity == "relu"


@torch.no_grad()
def rnn_fwd(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih=None, b_hh=None,
            lengths=None, nonlinearity: str = "tanh", allow_tf32: bool = False, fused: bool = True,
            plan: Optional[tiles.Plan] = None):
    """Whole-sequence forward of one RNN layer, one direction.

    x [T, B, I], h0 [B, H], w_ih [H, I], w_hh [H, H], b_* [H] or None, lengths None or int [B].
    Returns (out [T, B, H], h_n [B, H]) in x's dtype and, for backward, hs [T+1, B, H] in the
    state dtype. plan: persistent_plan()'s, for one launch for all steps; None: one launch per
    step. Same buffers and results.
    """
    relu = _relu(nonlinearity)
    T, B, I = x.shape
    H = w_hh.shape[1]
    dt, sd, dev = x.dtype, config.state_dtype(x.dtype), x.device
    x, w_ih, w_hh = x.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    lengths = None if lengths is None else lengths.contiguous()

    xp = input_projection(x, w_ih, b_ih, b_hh, lengths=lengths)  # x's padding as 0
    hs = alloc((T + 1, B, H), sd, dev)
    hs[0].copy_(h0)
    out = alloc((T, B, H), dt, dev)
    fma, ieee, upcast = dot_flags(w_hh.dtype, allow_tf32, dev)
    if plan is not None:
        rnn_persistent.rnn_fwd_loop(plan, xp, w_hh, hs, out, lengths, relu, fma, ieee, upcast)
    else:
        mm = None if fused else alloc((B, H), w_hh.dtype, dev)
        BB, BH, BK, nw = rnn_blocks(B, H, "fwd", fused, dt, sm_count(dev))
        grid = (triton.cdiv(B, BB), triton.cdiv(H, BH))
        step = StepLauncher(rnn_fwd_kernel, grid, xp, w_hh if fused else None, mm, hs, out, lengths, 0, B, H,
                            RELU=relu, FMA=fma, IEEE=ieee, UPCAST=upcast, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK,
                            num_warps=nw)
        w_t, cast = w_hh.t(), hs.dtype != w_hh.dtype  # once, not per step
        for t in range(T):
            if not fused:
                torch.mm(hs[t].to(w_hh.dtype) if cast else hs[t], w_t, out=mm)
            step(t)
    return out, hs[T].to(dt, copy=True), hs


@torch.no_grad()
def rnn_bwd(dout: torch.Tensor, dh_n: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
            hs: torch.Tensor, lengths=None, nonlinearity: str = "tanh", allow_tf32: bool = False, fused: bool = True,
            need_dx: bool = True, need_dw: bool = True, plan: Optional[tiles.Plan] = None):
    """Whole-sequence backward matching rnn_fwd: reverse recurrence with the fused kernels, then
    the weight, bias and input gradients as a few large GEMMs / reductions over T·B.

    Returns (dx [T, B, I] or None, dh0 [B, H], dw_ih [H, I], dw_hh [H, H], db [H] (state dtype;
    the gradient of both b_ih and b_hh)); weight gradients are None when not need_dw.
    plan: as rnn_fwd's (the reverse loop only; the GEMMs after it are the same).
    """
    relu = _relu(nonlinearity)
    T, B, I = x.shape
    H = w_hh.shape[1]
    dt, sd, dev = x.dtype, config.state_dtype(x.dtype), x.device
    w_hh = w_hh.contiguous()
    dout = dout.contiguous()
    lengths = None if lengths is None else lengths.contiguous()

    dP = alloc((T + 1, B, H), config.grad_dtype(dt), dev)  # 16 bits for 16-bit inputs
    dP[T].zero_()
    gh = dh_n.to(sd, copy=True).contiguous()
    fma, ieee, upcast = dot_flags(w_hh.dtype, allow_tf32, dev)
    if plan is not None:
        rnn_persistent.rnn_bwd_loop(plan, w_hh, hs, dout, dP, gh, lengths, relu, fma, ieee, upcast)
    else:
        carry = None if fused else alloc((B, H), w_hh.dtype, dev)
        BB, BH, BK, nw = rnn_blocks(B, H, "bwd", fused, dt, sm_count(dev))
        grid = (triton.cdiv(B, BB), triton.cdiv(H, BH))
        step = StepLauncher(rnn_bwd_kernel, grid, w_hh if fused else None, carry, hs, dout, dP, gh, lengths, 0, T,
                            B, H, RELU=relu, FMA=fma, IEEE=ieee, UPCAST=upcast, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK,
                            num_warps=nw)
        cast = dP.dtype != w_hh.dtype
        for t in range(T - 1, -1, -1):
            if not fused:
                torch.mm(dP[t + 1].to(w_hh.dtype) if cast else dP[t + 1], w_hh, out=carry)
            step(t)

    dx, dh0, dw_ih, dw_hh, db = after_loop_grads(dP, gh, x, hs, w_ih, w_hh, lengths, need_dx, need_dw)
    return dx, dh0.to(dt), dw_ih, dw_hh, db
