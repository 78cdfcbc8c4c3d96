"""GRU: the step kernels and their whole-sequence launchers.

Legend: T time steps, B batch rows, I input features, H hidden units, G = 3H gate rows of W_ih /
W_hh (order r, z, n, torch.nn's), K the recurrent matmul's reduction dim (H forward, 3H
backward). Time-major: x [T, B, I], out [T, B, H]. The saved state sequence hs is [T+1, B, H]
(slot 0 = h0, slot t+1 the carried state after step t) and the saved gates [T, B, 4H] (r, z, n
and hn = h_{t-1} W_hnᵀ + b_hn of each step), both in the state dtype: the backward's slopes
(1 − n², z (1 − z)) and h_{t-1} − n cancel, which 16 bits would not survive. A program owns
BLOCK_B rows x BLOCK_H units of all three gates, so the gate math is local to it.

Kernels, one launch a time step (the GRU has no persistent kernel: plan is always None):
    gru_fwd_kernel  the step, h_{t-1} W_hhᵀ included (tl.dot: no gate tensor through memory
                    between the matmul and the gate math).
    gru_bwd_kernel  the reverse step, the carried dhp_{t+1} W_hh fused.
The input-side and hidden-side pre-activation gradients differ in the n block (b_hn sits inside
the reset product), so the backward writes both, dxp and dhp, for the GEMMs after its loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import config
from ._common import (
    StepLauncher, _carry_dot, _dsigmoid, _dtanh, _load_gates, _mm, _reverse_step_masks, _sigmoid, _store_gates, _tanh,
    _tile, alloc, dot_flags, given, input_projection,
)
from .rnn import unsupported  # noqa: F401 (the RNN's rule: the kernels tile H and K; w_hh [3H, H])
from .tiles import gru_blocks, sm_count


def persistent_plan(*_args, **_kwargs):
    """(None, why): the GRU has no persistent kernel, so its "persistent" path runs the step
    loop (fused_rnn._paths.resolve warns once when it was asked for)."""
    return None, "the GRU has no persistent kernel"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.heuristics(given(HAS_BIAS="b_ptr", HAS_LENGTHS="len_ptr"))
@triton.jit(do_not_specialize=["t"])
def gru_fwd_kernel(
    xp_ptr,  # [T, B, G] x W_ihᵀ + b_ih, storage dtype
    w_ptr,  # [G, H] W_hh
    b_ptr,  # [G] b_hh, or None
    hs_ptr,  # [T+1, B, H] state dtype: reads slot t, writes slot t+1
    gates_ptr,  # [T, B, 4H] state dtype: writes r, z, n, hn of step t
    out_ptr,  # [T, B, H] storage dtype: writes step t
    len_ptr,  # [B] int64 lengths, or None
    t, B, H,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, cols, rmask, cmask, mask = _tile(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    ACC = hs_ptr.dtype.element_ty
    t64 = t.to(tl.int64)

    s_cur = ((t64 * B + rows) * H)[:, None] + cols[None, :]  # slot t of hs, step t of out
    s_nxt = (((t64 + 1) * B + rows) * H)[:, None] + cols[None, :]
    x_off = ((t64 * B + rows) * (3 * H))[:, None] + cols[None, :]  # gate r of step t in xp
    g_off = ((t64 * B + rows) * (4 * H))[:, None] + cols[None, :]  # r of step t in gates

    a_r = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    a_z = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    a_n = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    h_row = (t64 * B + rows) * H
    # W_hh row of (gate q, unit j) starts at (q H + j) H
    w_r = cols.to(tl.int64) * H
    w_z = (cols + H).to(tl.int64) * H
    w_n = (cols + 2 * H).to(tl.int64) * H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        wm = kmask[:, None] & cmask[None, :]
        hk = tl.load(hs_ptr + h_row[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        hk = hk.to(w_ptr.dtype.element_ty)
        a_r = _mm(hk, tl.load(w_ptr + w_r[None, :] + ks[:, None], mask=wm, other=0.0), a_r, FMA, IEEE, UPCAST)
        a_z = _mm(hk, tl.load(w_ptr + w_z[None, :] + ks[:, None], mask=wm, other=0.0), a_z, FMA, IEEE, UPCAST)
        a_n = _mm(hk, tl.load(w_ptr + w_n[None, :] + ks[:, None], mask=wm, other=0.0), a_n, FMA, IEEE, UPCAST)
    if HAS_BIAS:
        a_r += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        a_z += tl.load(b_ptr + H + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        a_n += tl.load(b_ptr + 2 * H + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    r = _sigmoid(tl.load(xp_ptr + x_off, mask=mask, other=0.0).to(ACC) + a_r)
    z = _sigmoid(tl.load(xp_ptr + x_off + H, mask=mask, other=0.0).to(ACC) + a_z)
    n = _tanh(tl.load(xp_ptr + x_off + 2 * H, mask=mask, other=0.0).to(ACC) + r * a_n)
    h_prev = tl.load(hs_ptr + s_cur, mask=mask, other=0.0)
    h_new = (1.0 - z) * n + z * h_prev
    _store_gates(gates_ptr, g_off, H, r, z, n, a_n, mask)

    if HAS_LENGTHS:
        valid = (t64 < tl.load(len_ptr + rows, mask=rmask, other=0))[:, None]
        h_keep = tl.where(valid, h_new, h_prev)
        out = tl.where(valid, h_new, 0.0)
    else:
        h_keep = h_new
        out = h_new
    tl.store(hs_ptr + s_nxt, h_keep, mask=mask)
    tl.store(out_ptr + s_cur, out.to(out_ptr.dtype.element_ty), mask=mask)


# Reverse step t. valid_t = t < len; h = h_{t-1} = hs[t]; r, z, n, hn the saved gates of step t;
# the gh buffer holds what reaches h_t from step t+1 other than through W_hh: dh_{t+1} z_{t+1}
# where step t+1 ran, all of it where it did not (h_{t+1} = h_t there).
#   dh    = gh + dhp_{t+1} W_hh + valid_t dout_t                     (tl.dot over K = 3H)
#   h_t   = (1 − z) n + z h:    dn_pre = dh (1 − z)(1 − n²)       dz_pre = dh (h − n) z (1 − z)
#   n     = tanh(xp_n + r hn):  dr_pre = dn_pre hn r (1 − r)      dhn = dn_pre r
#   dxp_t = valid_t (dr_pre, dz_pre, dn_pre)      dhp_t = valid_t (dr_pre, dz_pre, dhn)
#   gh   <- dh z where valid_t, else dh           (dh_{t-1} = gh + dhp_t W_hh, the next step's)
@triton.heuristics(given(HAS_LENGTHS="len_ptr"))
@triton.jit(do_not_specialize=["t", "T"])
def gru_bwd_kernel(
    w_ptr,  # [G, H] W_hh
    hs_ptr,  # [T+1, B, H] saved states: slot t = h_{t-1}
    gates_ptr,  # [T, B, 4H] saved r, z, n, hn
    dout_ptr,  # [T, B, H] storage dtype
    dxp_ptr,  # [T, B, G] grad_dtype: writes step t
    dhp_ptr,  # [T+1, B, G] grad_dtype: reads slot t+1, writes slot t; slot T is zero
    gh_ptr,  # [B, H] state dtype, in and out (above)
    len_ptr,  # [B] int64 lengths, or None
    t, T, B, H,
    HAS_LENGTHS: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, cols, rmask, cmask, mask = _tile(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    ACC = gh_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    G = 3 * H

    valid, _ = _reverse_step_masks(len_ptr, rows, rmask, t64, T, HAS_LENGTHS, BLOCK_B)
    vm = valid & mask

    s_cur = ((t64 * B + rows) * H)[:, None] + cols[None, :]
    b_off = (rows * H)[:, None] + cols[None, :]
    d_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]
    g_off = ((t64 * B + rows) * (4 * H))[:, None] + cols[None, :]

    carry = _carry_dot(dhp_ptr, w_ptr, rows, rmask, cols, cmask, t64, B, H, G, ACC, FMA, IEEE, UPCAST,
                       BLOCK_B, BLOCK_H, BLOCK_K)
    dh = tl.load(gh_ptr + b_off, mask=mask, other=0.0) + carry
    dh += tl.where(valid, tl.load(dout_ptr + s_cur, mask=mask, other=0.0).to(ACC), 0.0)
    r, z, n, hn = _load_gates(gates_ptr, g_off, H, mask, ACC)
    h = tl.load(hs_ptr + s_cur, mask=mask, other=0.0).to(ACC)
    dn = tl.where(vm, dh * (1.0 - z) * _dtanh(n), 0.0)
    dz = tl.where(vm, dh * (h - n) * _dsigmoid(z), 0.0)
    dr = tl.where(vm, dn * hn * _dsigmoid(r), 0.0)
    tl.store(gh_ptr + b_off, tl.where(valid, dh * z, dh), mask=mask)
    ty = dxp_ptr.dtype.element_ty
    tl.store(dxp_ptr + d_off, dr.to(ty), mask=mask)
    tl.store(dxp_ptr + d_off + H, dz.to(ty), mask=mask)
    tl.store(dxp_ptr + d_off + 2 * H, dn.to(ty), mask=mask)
    tl.store(dhp_ptr + d_off, dr.to(ty), mask=mask)
    tl.store(dhp_ptr + d_off + H, dz.to(ty), mask=mask)
    tl.store(dhp_ptr + d_off + 2 * H, (dn * r).to(ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def gru_fwd(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih=None, b_hh=None,
            lengths=None, allow_tf32: bool = False, plan=None):
    """Whole-sequence forward of one GRU layer, one direction.

    x [T, B, I], h0 [B, H], w_ih [3H, I], w_hh [3H, H], b_* [3H] or None, lengths None or int [B].
    Returns (out [T, B, H], h_n [B, H]) in x's dtype and, for backward, hs [T+1, B, H] and gates
    [T, B, 4H] in the state dtype. plan: always None (no persistent kernel).
    """
    assert plan is None, "the GRU has no persistent kernel"
    T, B, I = x.shape
    H = w_hh.shape[1]
    dt, sd, dev = x.dtype, config.state_dtype(x.dtype), x.device
    x, w_ih, w_hh = x.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    lengths = None if lengths is None else lengths.contiguous()

    xp = input_projection(x, w_ih, b_ih, None, lengths=lengths)  # x's padding as 0; b_hh in the kernel
    hs = alloc((T + 1, B, H), sd, dev)
    hs[0].copy_(h0)
    gates = alloc((T, B, 4 * H), sd, dev)
    out = alloc((T, B, H), dt, dev)
    fma, ieee, upcast = dot_flags(w_hh.dtype, allow_tf32, dev)
    BB, BH, BK, nw = gru_blocks(B, H, "fwd", dt, sm_count(dev))
    grid = (triton.cdiv(B, BB), triton.cdiv(H, BH))
    step = StepLauncher(gru_fwd_kernel, grid, xp, w_hh, b_hh, hs, gates, out, lengths, 0, B, H,
                        FMA=fma, IEEE=ieee, UPCAST=upcast, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK, num_warps=nw)
    for t in range(T):
        step(t)
    return out, hs[T].to(dt, copy=True), hs, gates


@torch.no_grad()
def gru_bwd(dout: torch.Tensor, dh_n: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
            hs: torch.Tensor, gates: torch.Tensor, lengths=None, allow_tf32: bool = False, need_dx: bool = True,
            need_dw: bool = True, plan=None):
    """Whole-sequence backward matching gru_fwd: the reverse recurrence with the fused kernel,
    then the weight, bias and input gradients as a few large GEMMs / reductions over T·B, in the
    grad dtype (16 bits on tensor cores for 16-bit inputs, as kernels._common.after_loop_grads).

    Returns (dx [T, B, I] or None, dh0 [B, H], dw_ih [3H, I], dw_hh [3H, H], db_ih, db_hh [3H]
    (state dtype)); the last four None when not need_dw. plan: always None.
    """
    assert plan is None, "the GRU has no persistent kernel"
    T, B, I = x.shape
    H = w_hh.shape[1]
    G = 3 * H
    dt, sd, dev = x.dtype, config.state_dtype(x.dtype), x.device
    gd = config.grad_dtype(dt)
    w_hh = w_hh.contiguous()
    dout = dout.contiguous()
    lengths = None if lengths is None else lengths.contiguous()

    dxp = alloc((T, B, G), gd, dev)
    dhp = alloc((T + 1, B, G), gd, dev)  # slot T: the zero carry into the last step
    dhp[T].zero_()
    gh = dh_n.to(sd, copy=True).contiguous()
    fma, ieee, upcast = dot_flags(w_hh.dtype, allow_tf32, dev)
    BB, BH, BK, nw = gru_blocks(B, H, "bwd", dt, sm_count(dev))
    grid = (triton.cdiv(B, BB), triton.cdiv(H, BH))
    step = StepLauncher(gru_bwd_kernel, grid, w_hh, hs, gates, dout, dxp, dhp, gh, lengths, 0, T, B, H,
                        FMA=fma, IEEE=ieee, UPCAST=upcast, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK, num_warps=nw)
    for t in range(T - 1, -1, -1):
        step(t)

    # after the loop: large GEMMs over all T·B rows
    dh0 = gh + torch.mm(dhp[0], w_hh.to(gd)).to(sd)
    dxp2, dhp2 = dxp.view(T * B, G), dhp[:T].view(T * B, G)
    dx = torch.mm(dxp2, w_ih.to(gd)).view(T, B, I).to(dt) if need_dx else None
    dw_ih = dw_hh = db_ih = db_hh = None
    if need_dw:
        # dxp is 0 past the ends but 0 x NaN is NaN: x's padding zeroed (a copy, only with lengths)
        x2 = config.zero_padding(x, lengths).reshape(T * B, I).to(gd)
        dw_ih = torch.mm(dxp2.t(), x2).to(w_ih.dtype)
        dw_hh = torch.mm(dhp2.t(), hs[:T].reshape(T * B, H).to(gd)).to(w_hh.dtype)
        db_ih, db_hh = dxp2.sum(0, dtype=sd), dhp2.sum(0, dtype=sd)
    return dx, dh0.to(dt), dw_ih, dw_hh, db_ih, db_hh
