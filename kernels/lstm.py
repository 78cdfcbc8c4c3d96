"""LSTM and layer-norm LSTM: the step kernels and their whole-sequence launchers.

Legend: T time steps, B batch rows, I input features, H hidden units, G = 4H gate
pre-activations (order i, f, g, o; 4H contiguous per row), K the recurrent matmul's reduction
dim (H forward, G backward). Time-major: x [T, B, I], out [T, B, H]. The saved sequences hs, cs
are [T+1, B, H]: slot 0 = h0 / c0, slot t+1 of hs the output of step t (0 past a sequence's
end; out is the view hs[1:]), slot t+1 of cs the carried c after step t (held past the end), in
kernels.config's dtypes (the kernels carry c in the state dtype: registers, or the step path's
[2, B, H] buffer cc). The recurrent matmul of step t reads hs[t]: h_{t-1} on every row still
running, all it needs (a finished row's results are masked). A program owns BLOCK_B rows x
BLOCK_H units of all four gates, so the pointwise update is local to it; the layer-norm
variants hold whole rows (BLOCK_H >= H).

Kernels, one launch a time step (given a persistent plan, lstm_persistent.py or
ln_lstm_persistent.py runs the whole loop in one launch instead):
    lstm_fwd_kernel  FUSED: the step, h_{t-1} W_hhᵀ included (tl.dot: no gates tensor through
                     memory between the matmul and the gate math); else the pointwise update
                     from torch's matmul. Plain or layer-norm.
    lstm_bwd_kernel  the reverse step; FUSED fuses the carried dh = dG_{t+1} W_hh.
The forward saves the gate pre-activations (options().save_gates; docs/step-kernels.md says why
rather than recompute them) and the backward writes dG over them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import config, ln_lstm_persistent, lstm_persistent, tiles
from ._common import (
    StepLauncher,
    _carry_dot,
    _dsigmoid,
    _dtanh,
    _gate_chunk_dots,
    _load_gates,
    _ln_rows,
    _ln_rows_bwd, 
    _reverse_step_masks,
    _sigmoid,
    _store_gates,
    _tanh,
    _tile,
    after_loop_grads,
    alloc,
    dot_flags,
    given,
    input_projection,
)
from .tiles import lstm_blocks, sm_count


def unsupported(x: torch.Tensor, w_hh: torch.Tensor, ln) -> Optional[str]:
    """Why the kernels cannot take this problem (the caller falls back to the reference), or None."""
    if x.dtype not in config.SUPPORTED_DTYPES:
        return f"dtype {x.dtype}"
    T, B = x.shape[0], x.shape[1]
    H = w_hh.shape[0] // 4  # w_hh [4H, H], or [4H, P] with projections
    if T == 0 or B == 0 or H == 0:
        return f"an empty problem (T={T}, B={B}, H={H})"
    if ln is not None and H > config.LN_MAX_H:
        return f"layer-norm LSTM with hidden size {H} > {config.LN_MAX_H}"
    return None


def persistent_plan(direction: str, B: int, H: int, ln, fused: bool, dtype: torch.dtype, device,
                    limit: Optional[int] = None, allow_tf32: bool = False):
    """(tiles.Plan, "") when one persistent launch can run this layer's time loop in
    ``direction`` ("fwd" / "bwd"), else (None, why not). The layer-norm LSTM has its own kernels
    whatever ``fused`` says (its unfused step path above LN_FUSED_MAX_H says nothing against a
    persistent launch)."""
    if ln is not None:
        return tiles.plan_ln(direction, B, H, dtype, device, limit, allow_tf32)
    if not fused:
        return None, "the unfused step kernels were asked for"
    return tiles.plan("lstm", direction, B, H, dtype, device, limit, allow_tf32)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.heuristics(given(FUSED="w_ptr", LN="gw_ptr", HAS_LENGTHS="len_ptr", STORE_GATES="gates_ptr"))
@triton.jit(do_not_specialize=["t"])
def lstm_fwd_kernel(
    xp_ptr,  # [T, B, G] x W_ihᵀ + b_ih + b_hh, storage dtype
    w_ptr,  # [G, H] W_hh (FUSED) or None
    mm_ptr,  # [B, G] h_{t-1} W_hhᵀ computed by torch (not FUSED) or None
    hs_ptr,  # [T+1, B, H] lstm_hs_dtype: reads slot t, writes slot t+1 (= out[t]: 0 past the end)
    cs_ptr,  # [T+1, B, H] lstm_cs_dtype: writes slot t+1 (held past the end)
    cc_ptr,  # [2, B, H] state dtype: the carried c, slot t % 2 in, (t+1) % 2 out (slot 0 = c0 at t = 0)
    gates_ptr,  # [T, B, G] lstm_gates_dtype pre-activations (before any LN), or None; may be xp_ptr
    len_ptr,  # [B] int64 lengths, or None
    gw_ptr, gb_ptr, cw_ptr, cb_ptr,  # LN weights: gates [G], [G]; cell [H], [H]; or None
    t, B, H, eps,
    FUSED: tl.constexpr, LN: tl.constexpr, HAS_LENGTHS: tl.constexpr, STORE_GATES: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows, cols, rmask, cmask, mask = _tile(tl.program_id(0), tl.program_id(1), B, H, BLOCK_B, BLOCK_H)
    ACC = cc_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    G = 4 * H

    s_nxt = (((t64 + 1) * B + rows) * H)[:, None] + cols[None, :]  # slot t+1 of hs/cs
    g_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]  # gate i of step t in [T, B, G]

    if FUSED:
        a_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        a_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        a_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        a_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        h_row = (t64 * B + rows) * H
        # W_hh row of (gate q, unit j) starts at (q H + j) H
        w_i = cols.to(tl.int64) * H
        w_f = (cols + H).to(tl.int64) * H
        w_g = (cols + 2 * H).to(tl.int64) * H
        w_o = (cols + 3 * H).to(tl.int64) * H
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            hk = tl.load(hs_ptr + h_row[:, None] + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            hk = hk.to(w_ptr.dtype.element_ty)
            a_i, a_f, a_g, a_o = _gate_chunk_dots(hk, w_ptr, w_i, w_f, w_g, w_o, ks, kmask, cmask,
                                                  a_i, a_f, a_g, a_o, FMA, IEEE, UPCAST)
    else:
        m_off = (rows * G)[:, None] + cols[None, :]
        a_i, a_f, a_g, a_o = _load_gates(mm_ptr, m_off, H, mask, ACC)
    a_i += tl.load(xp_ptr + g_off, mask=mask, other=0.0).to(ACC)
    a_f += tl.load(xp_ptr + g_off + H, mask=mask, other=0.0).to(ACC)
    a_g += tl.load(xp_ptr + g_off + 2 * H, mask=mask, other=0.0).to(ACC)
    a_o += tl.load(xp_ptr + g_off + 3 * H, mask=mask, other=0.0).to(ACC)
    if STORE_GATES:
        _store_gates(gates_ptr, g_off, H, a_i, a_f, a_g, a_o, mask)

    if LN:  # BLOCK_H >= H: this program holds whole rows
        _, _, a_i = _ln_rows(a_i, cmask, tl.load(gw_ptr + cols, mask=cmask, other=0.0).to(ACC),
                             tl.load(gb_ptr + cols, mask=cmask, other=0.0).to(ACC), H, eps)
        _, _, a_f = _ln_rows(a_f, cmask, tl.load(gw_ptr + H + cols, mask=cmask, other=0.0).to(ACC),
                             tl.load(gb_ptr + H + cols, mask=cmask, other=0.0).to(ACC), H, eps)
        _, _, a_g = _ln_rows(a_g, cmask, tl.load(gw_ptr + 2 * H + cols, mask=cmask, other=0.0).to(ACC),
                             tl.load(gb_ptr + 2 * H + cols, mask=cmask, other=0.0).to(ACC), H, eps)
        _, _, a_o = _ln_rows(a_o, cmask, tl.load(gw_ptr + 3 * H + cols, mask=cmask, other=0.0).to(ACC),
                             tl.load(gb_ptr + 3 * H + cols, mask=cmask, other=0.0).to(ACC), H, eps)
    gi = _sigmoid(a_i)
    gf = _sigmoid(a_f)
    gg = _tanh(a_g)
    go = _sigmoid(a_o)
    c_off = (((t64 % 2) * B + rows) * H)[:, None] + cols[None, :]  # slot t % 2 of cc
    c_nxt = ((((t64 + 1) % 2) * B + rows) * H)[:, None] + cols[None, :]
    c_prev = tl.load(cc_ptr + c_off, mask=mask, other=0.0)
    c_new = gf * c_prev + gi * gg
    if LN:
        _, _, z = _ln_rows(c_new, cmask, tl.load(cw_ptr + cols, mask=cmask, other=0.0).to(ACC),
                           tl.load(cb_ptr + cols, mask=cmask, other=0.0).to(ACC), H, eps)
    else:
        z = c_new
    h_new = go * _tanh(z)

    if HAS_LENGTHS:
        valid = (t64 < tl.load(len_ptr + rows, mask=rmask, other=0))[:, None]
        h_out = tl.where(valid, h_new, 0.0)
        c_keep = tl.where(valid, c_new, c_prev)
    else:
        h_out = h_new
        c_keep = c_new
    tl.store(hs_ptr + s_nxt, h_out.to(hs_ptr.dtype.element_ty), mask=mask)
    tl.store(cc_ptr + c_nxt, c_keep, mask=mask)
    tl.store(cs_ptr + s_nxt, c_keep.to(cs_ptr.dtype.element_ty), mask=mask)


# Reverse step t. valid_t = t < len; gh_t, gc_t = gradients w.r.t. the carried states h_t, c_t
# (gh_{T-1} = dh_n, gc_{T-1} = dc_n); a_q the saved pre-activations, y_q = a_q or LN_q(a_q).
#   gh_t  = [not valid_{t+1}] gh_{t+1} + dG_{t+1} W_hh          (FUSED: tl.dot over K = G)
#   dh    = valid_t (dout_t + gh_t)          dc = valid_t gc_t
#   z     = c_t (plain) or LN_c(c_t);  do = dh tanh(z);  dz = dh o (1 - tanh² z)
#   dc   += dz (plain) or LNback(dz γ_c);    dγ_c += dz ĉ,  dβ_c += dz
#   di = dc g,  df = dc c_{t-1},  dg = dc i,  gc_{t-1} = valid_t dc f + [not valid_t] gc_t
#   dy_i = di i(1-i), dy_f = df f(1-f), dy_g = dg (1-g²), dy_o = do o(1-o)
#   dG_t  = valid_t (dy (plain) or LNback_q(dy_q γ_q));   dγ_q += dy_q â_q,  dβ_q += dy_q
#   LNback(dv̂) = rstd (dv̂ − mean(dv̂) − v̂ mean(dv̂ v̂))
# LN parameter gradients are summed over this program's rows and added to its own row of the
# partial-sum buffers each step (fixed order: deterministic, no atomics); summed over row blocks
# after the loop.
@triton.heuristics(given(FUSED="w_ptr", LN="gw_ptr", HAS_LENGTHS="len_ptr"))
@triton.jit(do_not_specialize=["t", "T"])
def lstm_bwd_kernel(
    gates_ptr,  # [T, B, G] saved pre-activations, lstm_gates_dtype
    w_ptr,  # [G, H] W_hh (FUSED) or None
    carry_ptr,  # [B, H] dG_{t+1} W_hh computed by torch (not FUSED) or None
    cs_ptr,  # [T+1, B, H] saved c (lstm_cs_dtype): slot t = c_{t-1}, slot t+1 = c_t
    dout_ptr,  # [T, B, H] storage dtype
    dg_ptr,  # [T+1, B, G] grad_dtype: reads slot t+1 (FUSED), writes slot t; slot T is zero
    gh_ptr,  # [B, H] in: gh_{t+1}, out: gh_t
    gc_ptr,  # [B, H] in: gc_t, out: gc_{t-1}
    len_ptr,  # [B] int64 lengths, or None
    gw_ptr, gb_ptr, cw_ptr, cb_ptr,  # LN weights, or None
    dgw_ptr, dgb_ptr, dcw_ptr, dcb_ptr,  # LN partial sums [n_row_blocks, G] / [n_row_blocks, H]
    t, T, B, H, eps,
    FUSED: tl.constexpr, LN: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    FMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows, cols, rmask, cmask, mask = _tile(pid_b, pid_h, B, H, BLOCK_B, BLOCK_H)
    ACC = gh_ptr.dtype.element_ty
    t64 = t.to(tl.int64)
    G = 4 * H

    valid, nvalid = _reverse_step_masks(len_ptr, rows, rmask, t64, T, HAS_LENGTHS, BLOCK_B)

    s_cur = ((t64 * B + rows) * H)[:, None] + cols[None, :]
    s_nxt = (((t64 + 1) * B + rows) * H)[:, None] + cols[None, :]
    g_off = ((t64 * B + rows) * G)[:, None] + cols[None, :]
    b_off = (rows * H)[:, None] + cols[None, :]

    if FUSED:
        carry = _carry_dot(dg_ptr, w_ptr, rows, rmask, cols, cmask, t64, B, H, G, ACC, FMA, IEEE, UPCAST,
                           BLOCK_B, BLOCK_H, BLOCK_K)
    else:
        carry = tl.load(carry_ptr + b_off, mask=mask, other=0.0).to(ACC)
    gh = tl.where(nvalid, 0.0, tl.load(gh_ptr + b_off, mask=mask, other=0.0)) + carry
    tl.store(gh_ptr + b_off, gh, mask=mask)
    gc = tl.load(gc_ptr + b_off, mask=mask, other=0.0)
    dh = tl.where(valid, tl.load(dout_ptr + s_cur, mask=mask, other=0.0).to(ACC) + gh, 0.0)
    dc = tl.where(valid, gc, 0.0)

    a_i, a_f, a_g, a_o = _load_gates(gates_ptr, g_off, H, mask, ACC)
    if LN:
        w_gi = tl.load(gw_ptr + cols, mask=cmask, other=0.0).to(ACC)
        w_gf = tl.load(gw_ptr + H + cols, mask=cmask, other=0.0).to(ACC)
        w_gg = tl.load(gw_ptr + 2 * H + cols, mask=cmask, other=0.0).to(ACC)
        w_go = tl.load(gw_ptr + 3 * H + cols, mask=cmask, other=0.0).to(ACC)
        n_i, r_i, y_i = _ln_rows(a_i, cmask, w_gi, tl.load(gb_ptr + cols, mask=cmask, other=0.0).to(ACC), H, eps)
        n_f, r_f, y_f = _ln_rows(a_f, cmask, w_gf, tl.load(gb_ptr + H + cols, mask=cmask, other=0.0).to(ACC), H, eps)
        n_g, r_g, y_g = _ln_rows(a_g, cmask, w_gg, tl.load(gb_ptr + 2 * H + cols, mask=cmask, other=0.0).to(ACC),
                                 H, eps)
        n_o, r_o, y_o = _ln_rows(a_o, cmask, w_go, tl.load(gb_ptr + 3 * H + cols, mask=cmask, other=0.0).to(ACC),
                                 H, eps)
    else:
        y_i = a_i
        y_f = a_f
        y_g = a_g
        y_o = a_o
    gi = _sigmoid(y_i)
    gf = _sigmoid(y_f)
    gg = _tanh(y_g)
    go = _sigmoid(y_o)
    c_prev = tl.load(cs_ptr + s_cur, mask=mask, other=0.0).to(ACC)
    c_new = tl.load(cs_ptr + s_nxt, mask=mask, other=0.0).to(ACC)  # = c_t where valid_t
    if LN:
        w_c = tl.load(cw_ptr + cols, mask=cmask, other=0.0).to(ACC)
        n_c, r_c, z = _ln_rows(c_new, cmask, w_c, tl.load(cb_ptr + cols, mask=cmask, other=0.0).to(ACC), H, eps)
    else:
        z = c_new
    tz = _tanh(z)
    vm = valid & mask
    # dy_o first, the gc store before the LN backward: go, gf die sooner (the LN backward at H128
    # spilled, sm_90 compile)
    dy_o = tl.where(vm, dh * tz * _dsigmoid(go), 0.0)
    dz = tl.where(vm, dh * go * _dtanh(tz), 0.0)
    if LN:
        dc += _ln_rows_bwd(dz * w_c[None, :], n_c, r_c, cmask, H)
        p_h = pid_b.to(tl.int64) * H + cols
        tl.store(dcw_ptr + p_h, tl.load(dcw_ptr + p_h, mask=cmask) + tl.sum(dz * n_c, axis=0), mask=cmask)
        tl.store(dcb_ptr + p_h, tl.load(dcb_ptr + p_h, mask=cmask) + tl.sum(dz, axis=0), mask=cmask)
    else:
        dc += dz
    dy_i = tl.where(vm, dc * gg * _dsigmoid(gi), 0.0)
    dy_f = tl.where(vm, dc * c_prev * _dsigmoid(gf), 0.0)
    dy_g = tl.where(vm, dc * gi * _dtanh(gg), 0.0)
    tl.store(gc_ptr + b_off, tl.where(valid, dc * gf, gc), mask=mask)
    if LN:
        p_g = pid_b.to(tl.int64) * G + cols
        tl.store(dgw_ptr + p_g, tl.load(dgw_ptr + p_g, mask=cmask) + tl.sum(dy_i * n_i, axis=0), mask=cmask)
        tl.store(dgw_ptr + p_g + H, tl.load(dgw_ptr + p_g + H, mask=cmask) + tl.sum(dy_f * n_f, axis=0), mask=cmask)
        tl.store(dgw_ptr + p_g + 2 * H, tl.load(dgw_ptr + p_g + 2 * H, mask=cmask) + tl.sum(dy_g * n_g, axis=0),
                 mask=cmask)
        tl.store(dgw_ptr + p_g + 3 * H, tl.load(dgw_ptr + p_g + 3 * H, mask=cmask) + tl.sum(dy_o * n_o, axis=0),
                 mask=cmask)
        tl.store(dgb_ptr + p_g, tl.load(dgb_ptr + p_g, mask=cmask) + tl.sum(dy_i, axis=0), mask=cmask)
        tl.store(dgb_ptr + p_g + H, tl.load(dgb_ptr + p_g + H, mask=cmask) + tl.sum(dy_f, axis=0), mask=cmask)
        tl.store(dgb_ptr + p_g + 2 * H, tl.load(dgb_ptr + p_g + 2 * H, mask=cmask) + tl.sum(dy_g, axis=0), mask=cmask)
        tl.store(dgb_ptr + p_g + 3 * H, tl.load(dgb_ptr + p_g + 3 * H, mask=cmask) + tl.sum(dy_o, axis=0), mask=cmask)
        # dy_q is 0 on invalid rows and padded columns, so these are 0 there too
        dy_i = _ln_rows_bwd(dy_i * w_gi[None, :], n_i, r_i, cmask, H)
        dy_f = _ln_rows_bwd(dy_f * w_gf[None, :], n_f, r_f, cmask, H)
        dy_g = _ln_rows_bwd(dy_g * w_gg[None, :], n_g, r_g, cmask, H)
        dy_o = _ln_rows_bwd(dy_o * w_go[None, :], n_o, r_o, cmask, H)
    _store_gates(dg_ptr, g_off, H, dy_i, dy_f, dy_g, dy_o, mask)




# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def ln_args(ln, H: int):
    if ln is None:
        return (None, None, None, None)
    gw, gb, cw, cb = (p.contiguous() for p in ln)
    G = 4 * H
    assert gw.shape == (G,) and gb.shape == (G,) and cw.shape == (H,) and cb.shape == (H,), "LN parameter shapes"
    return gw, gb, cw, cb


def gates_and_projection(x, w_ih, b_ih, b_hh, ln, save_gates: bool, lengths=None):
    """(gates_buf [T+1, B, G] or None, gates = gates_buf[:T] or None, xp [T, B, G]; x's padding
    past ``lengths`` projected as 0: input_projection).

    gates_buf: slots 0..T-1 the gates, slot T zero, so that the backward can write dG [T+1, B, G]
    (its slot T: the zero carry into the last step) over this buffer in place.
    xp is the launcher's own temporary: each program overwrites the xp tile of step t with the
    gates of step t after reading it (no other program reads that tile), so when the dtypes
    agree the input projection is written straight into the gates buffer. A separate xp when
    they differ (the LN-LSTM in 16 bits) or when no gates are saved."""
    T, B, _ = x.shape
    G = w_ih.shape[0]
    gates_buf = gates = None
    if save_gates:
        gates_buf = alloc((T + 1, B, G), config.lstm_gates_dtype(x.dtype, ln is not None), x.device)
        gates_buf[T].zero_()
        gates = gates_buf[:T]
    share = gates is not None and gates.dtype == x.dtype
    return gates_buf, gates, input_projection(x, w_ih, b_ih, b_hh, out=gates if share else None, lengths=lengths)


def ln_partials(ln, n_row_blocks: int, H: int, dtype: torch.dtype, device):
    """The backward's zeroed LN parameter-gradient partial sums, one row per row block:
    [n_row_blocks, G] (gate weight, gate bias), [n_row_blocks, H] (cell weight, cell bias);
    four Nones without LN."""
    if ln is None:
        return [None] * 4
    return [torch.zeros((n_row_blocks, n), dtype=dtype, device=device) for n in (4 * H, 4 * H, H, H)]


def ln_grads(parts, ln_args):
    """The LN parameter gradients: the partial sums over row blocks, in the parameters' dtypes."""
    return tuple(p.sum(0).to(q.dtype) for p, q in zip(parts, ln_args))


def forward_buffers(x, c0, w_ih, b_ih, b_hh, ln, lengths, save_gates: bool):
    """The LSTM forwards' common start (kernels/lstm.py, lstm_proj.py): (x, lengths made
    contiguous, the LN parameters (ln_args), gates_buf, gates, xp (gates_and_projection), cs
    [T+1, B, H] with c0 in slot 0)."""
    T, B, _ = x.shape
    x, w_ih = x.contiguous(), w_ih.contiguous()
    lengths = None if lengths is None else lengths.contiguous()
    gates_buf, gates, xp = gates_and_projection(x, w_ih, b_ih, b_hh, ln, save_gates, lengths)
    cs = alloc((T + 1, B, c0.shape[1]), config.lstm_cs_dtype(x.dtype, ln is not None), x.device)
    cs[0].copy_(c0)
    return x, lengths, ln_args(ln, c0.shape[1]), gates_buf, gates, xp, cs


@torch.no_grad()
def lstm_fwd(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
             b_ih: Optional[torch.Tensor] = None, b_hh: Optional[torch.Tensor] = None,
             ln: Optional[Sequence[torch.Tensor]] = None, lengths: Optional[torch.Tensor] = None,
             eps: float = config.LN_EPS, allow_tf32: bool = False, fused: Optional[bool] = None,
             save_gates: Optional[bool] = None, plan: Optional[tiles.Plan] = None):
    """Whole-sequence forward of one LSTM layer, one direction.

    x [T, B, I], h0/c0 [B, H], w_ih [G, I], w_hh [G, H], b_* [G] or None, ln None or
    (gate_w [G], gate_b [G], cell_w [H], cell_b [H]), lengths None or int [B].
    Returns (out [T, B, H], h_n [B, H], c_n [B, H]) in x's dtype and, for backward,
    (hs, cs [T+1, B, H], gates [T+1, B, G] or an empty tensor) in kernels.config's dtypes.
    ``out`` is hs[1:], a view (the LSTM's hs dtype is x's): the saved h_t cost no buffer of
    their own. c_n = cs[T]; h_n is gathered from hs at each sequence's last step.
    plan: persistent_plan()'s, for one launch for all steps; None: one launch per step. Same
    buffers and results either way. fused, save_gates None: config's defaults.
    """
    T, B, I = x.shape
    G, H = w_hh.shape
    dt, sd, dev = x.dtype, config.state_dtype(x.dtype), x.device
    if fused is None:
        fused = config.default_fused(H, ln, dt)
    if save_gates is None:
        save_gates = config.options().save_gates
    w_hh = w_hh.contiguous()
    x, lengths, (gw, gb, cw, cb), gates_buf, gates, xp, cs = forward_buffers(x, c0, w_ih, b_ih, b_hh, ln, lengths,
                                                                             save_gates)
    hs = alloc((T + 1, B, H), config.lstm_hs_dtype(dt), dev)
    assert hs.dtype == dt, "out is a view of hs: the LSTM's hs dtype must be x's (kernels.config)"
    hs[0].copy_(h0)
    fma, ieee, upcast = dot_flags(w_hh.dtype, allow_tf32, dev)
    if plan is not None and ln is not None:
        ln_lstm_persistent.ln_lstm_fwd_loop(plan, xp, w_hh, hs, cs, gates, (gw, gb, cw, cb), lengths, eps,
                                            fma, ieee, upcast)
    elif plan is not None:
        lstm_persistent.lstm_fwd_loop(plan, xp, w_hh, hs, cs, gates, lengths, fma, ieee, upcast)
    else:
        mm = None if fused else alloc((B, G), w_hh.dtype, dev)
        cc = alloc((2, B, H), sd, dev)  # c carried in the state dtype (cs may be 16-bit)
        cc[0].copy_(c0)
        BB, BH, BK, nw = lstm_blocks(B, H, "fwd", fused, ln is not None, dt, sm_count(dev))
        grid = (triton.cdiv(B, BB), triton.cdiv(H, BH))
        step = StepLauncher(lstm_fwd_kernel, grid, xp, w_hh if fused else None, mm, hs, cs, cc, gates, lengths, gw, gb,
                            cw, cb, 0, B, H, eps, FMA=fma, IEEE=ieee, UPCAST=upcast, BLOCK_B=BB, BLOCK_H=BH,
                            BLOCK_K=BK, num_warps=nw)
        w_t, cast = w_hh.t(), hs.dtype != w_hh.dtype  # once, not per step
        for t in range(T):
            if not fused:
                torch.mm(hs[t].to(w_hh.dtype) if cast else hs[t], w_t, out=mm)
            step(t)
    h_n = last_h(hs, lengths)
    c_n = cs[T].to(dt, copy=True)
    if gates_buf is None:
        gates_buf = cs.new_empty(0, dtype=sd)
    return hs[1:], h_n, c_n, hs, cs, gates_buf


def last_h(hs: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """h_n [B, H] (a new tensor) from hs [T+1, B, H] = (h0, out_0 .. out_{T-1}): slot
    min(length, T) of each row (slot 0, h0, for an empty sequence). A gather on the device: no
    host sync."""
    T = hs.shape[0] - 1
    if lengths is None:
        return hs[T].clone()
    idx = lengths.clamp(0, T)
    return hs[idx, torch.arange(hs.shape[1], device=hs.device)]


@torch.no_grad()
def lstm_bwd(dout: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor,
             w_hh: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor, gates: torch.Tensor,
             b_ih: Optional[torch.Tensor] = None, b_hh: Optional[torch.Tensor] = None,
             ln: Optional[Sequence[torch.Tensor]] = None, lengths: Optional[torch.Tensor] = None,
             eps: float = config.LN_EPS, allow_tf32: bool = False, fused: Optional[bool] = None,
             need_dx: bool = True, need_dw: bool = True, plan: Optional[tiles.Plan] = None,
             consume_gates: bool = False):
    """Whole-sequence backward matching lstm_fwd: reverse recurrence with the fused kernels,
    then the weight, bias and input gradients as a few large GEMMs / reductions over T·B.

    gates: lstm_fwd's [T+1, B, G] buffer (a [T, B, G] tensor is taken too), or an empty tensor
    (recomputed here). The gate gradients dG [T+1, B, G] are written over the gates buffer in
    place when it has the spare slot T, dG's dtype (config.grad_dtype) and either was
    recomputed here or ``consume_gates`` is True: step t reads gates[t] and writes dG[t], the
    same tile of the same program, and every other reader of dG reads slots > t, already
    overwritten. That saves a [T+1, B, G] buffer and leaves the caller's gates holding dG: only
    a caller that will not read them again may pass consume_gates (LSTMFunction's first eager
    backward).

    Returns (dx [T, B, I] or None, dh0, dc0 [B, H], dw_ih [G, I], dw_hh [G, H], db [G]
    (state dtype; the gradient of both b_ih and b_hh), dln = (dgw, dgb, dcw, dcb) or None);
    weight gradients are None when not need_dw. plan: as lstm_fwd's (the reverse loop only; the
    GEMMs after it are the same).
    """
    T, B, I = x.shape
    G, H = w_hh.shape
    dt, sd, dev = x.dtype, config.state_dtype(x.dtype), x.device
    if fused is None:
        fused = config.default_fused(H, ln, dt)
    w_hh = w_hh.contiguous()
    dout = dout.contiguous()
    gw, gb, cw, cb = ln_args(ln, H)
    lengths = None if lengths is None else lengths.contiguous()
    if gates is None or gates.numel() == 0:
        # recompute the pre-activations in one GEMM (same operands as forward's: h in w's dtype),
        # in the dtype forward would have saved them in, into a buffer of our own (consumable)
        gd = config.lstm_gates_dtype(dt, ln is not None)
        xp = input_projection(x.contiguous(), w_ih.contiguous(), b_ih, b_hh, lengths=lengths)
        hprev = hs[:T].reshape(T * B, H).to(w_hh.dtype).to(gd)
        gates = alloc((T + 1, B, G), gd, dev)
        gates[T].zero_()
        torch.addmm(xp.reshape(T * B, G).to(gd), hprev, w_hh.to(gd).t(), out=gates[:T].view(T * B, G))
        consume_gates = True
    assert gates.shape[1:] == (B, G) and gates.shape[0] in (T, T + 1) and gates.is_contiguous(), \
        f"gates: expected [T(+1)={T}(+1), B={B}, G={G}], contiguous; got {tuple(gates.shape)}"

    # dG in grad_dtype (16 bits for 16-bit inputs: its readers are the recurrent tl.dot and the
    # GEMMs after the loop). Slot T stays zero: the carried gradient into the last step is dh_n.
    gd = config.grad_dtype(dt)
    if consume_gates and gates.shape[0] == T + 1 and gates.dtype == gd:
        # slot T: zero since lstm_fwd (no kernel writes it), and not zeroed again here: a torch
        # in-place op would bump the saved tensor's version counter, and a later backward of the
        # same graph would then refuse to unpack the saved tensors
        dG = gates
    else:
        dG = alloc((T + 1, B, G), gd, dev)
        dG[T].zero_()
    gates = gates[:T]
    gh = dh_n.to(sd, copy=True).contiguous()
    gc = dc_n.to(sd, copy=True).contiguous()
    carry = None if fused or plan is not None else alloc((B, H), w_hh.dtype, dev)
    BB, BH, BK, nw = lstm_blocks(B, H, "bwd", fused, ln is not None, dt, sm_count(dev))
    nrb = triton.cdiv(B, BB)
    parts = ln_partials(ln, nrb, H, sd, dev)
    fma, ieee, upcast = dot_flags(w_hh.dtype, allow_tf32, dev)
    if plan is not None and ln is not None:
        # LN parameter gradients into rows 0..R-1 of the step path's zeroed partial sums
        # (R = cdiv(B, 64) <= cdiv(B, BLOCK_B of the LN step kernels) rows)
        ln_lstm_persistent.ln_lstm_bwd_loop(plan, gates, w_hh, cs, dout, dG, gh, gc, (gw, gb, cw, cb), lengths,
                                            eps, parts, fma, ieee, upcast)
    elif plan is not None:
        lstm_persistent.lstm_bwd_loop(plan, gates, w_hh, cs, dout, dG, gh, gc, lengths, fma, ieee, upcast)
    else:
        grid = (nrb, triton.cdiv(H, BH))
        step = StepLauncher(lstm_bwd_kernel, grid, gates, w_hh if fused else None, carry, cs, dout, dG, gh, gc, lengths,
                            gw, gb, cw, cb, *parts, 0, T, B, H, eps, FMA=fma, IEEE=ieee, UPCAST=upcast, BLOCK_B=BB,
                            BLOCK_H=BH, BLOCK_K=BK, num_warps=nw)
        cast = dG.dtype != w_hh.dtype
        for t in range(T - 1, -1, -1):
            if not fused:
                torch.mm(dG[t + 1].to(w_hh.dtype) if cast else dG[t + 1], w_hh, out=carry)
            step(t)

    # after the loop: large GEMMs over all T·B rows
    dx, dh0, dw_ih, dw_hh, db = after_loop_grads(dG, gh, x, hs, w_ih, w_hh, lengths, need_dx, need_dw)
    dln = None
    if need_dw and ln is not None:
        dln = ln_grads(parts, (gw, gb, cw, cb))
    return dx, dh0.to(dt), gc.to(dt), dw_ih, dw_hh, db, dln
