"""The LSTM with projections (torch.nn.LSTM's ``proj_size``): whole-sequence launchers.

    h_t = W_hr (o_t * tanh(c_t))        h_t [B, P] with P < H; c_t stays [B, H]

so the recurrent weight W_hh is [G, P] and the recurrent matmul's K is P, not H. The fused step
kernels of kernels/lstm.py own a block of hidden units and read h_{t-1} with K = H, and a
program's units need all P columns of h_t, which every program's units feed (W_hr mixes them):
no per-program slice closes the step. So each step runs cuBLAS products around the unfused
pointwise kernels of kernels/lstm.py (FUSED=False, plain or layer-norm), unchanged:

    forward step t    mm = h_{t-1} W_hhᵀ (cuBLAS)  ->  lstm_fwd_kernel (gates, c_t, and
                      u_t = o_t * tanh(c_t) into hs)  ->  h_t = u_t W_hrᵀ (cuBLAS, into hp)
    reverse step t    ĝ_t = [not valid_{t+1}] ĝ_{t+1} + dG_{t+1} W_hh     (P wide; cuBLAS)
                      dĥ_t = valid_t (dout_t + ĝ_t);   du_t = dĥ_t W_hr   (cuBLAS)
                      lstm_bwd_kernel with dout = du_t and a zero carry: its own carried dh
                      stays 0, so its dh is du_t; it writes dG_t and carries dc as for the LSTM
    after the loop    dW_hr = Σ_t dĥ_tᵀ u_t, and the GEMMs of after_loop_grads with hp in place
                      of hs (dW_hh = Σ dG_tᵀ h_{t-1}, P wide; dh0 = dG_0 W_hh)

Buffers: hp [T+1, B, P] (slot 0 = h0, then the outputs: 0 past a sequence's end, since u is 0
there; out is the view hp[1:]), hs [T+1, B, H] (u_t in slot t+1; slot 0 zero, unused), cs and
gates as kernels/lstm.py's, in kernels.config's dtypes. The backward does not write over the
saved gates (a [T+1, B, G] buffer of its own for dG). Launches a step: docs/step-kernels.md.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton

from . import config
from ._common import StepLauncher, after_loop_grads, alloc, dot_flags
from .lstm import forward_buffers, last_h, ln_args, ln_grads, ln_partials, lstm_bwd_kernel, lstm_fwd_kernel
from .tiles import lstm_blocks, sm_count


def _dims(w_hh: torch.Tensor, w_hr: torch.Tensor):
    G, P = w_hh.shape
    H = G // 4
    assert G == 4 * H and tuple(w_hr.shape) == (P, H), \
        f"w_hh [4H, P] and w_hr [P, H] expected, got {tuple(w_hh.shape)} and {tuple(w_hr.shape)}"
    return G, H, P


@torch.no_grad()
def lstm_proj_fwd(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  w_hr: torch.Tensor, b_ih: Optional[torch.Tensor] = None, b_hh: Optional[torch.Tensor] = None,
                  ln: Optional[Sequence[torch.Tensor]] = None, lengths: Optional[torch.Tensor] = None,
                  eps: float = config.LN_EPS, allow_tf32: bool = False):
    """x [T, B, I], h0 [B, P], c0 [B, H], w_ih [G, I], w_hh [G, P], w_hr [P, H], b_* [G] or None,
    ln None or (gate_w [G], gate_b [G], cell_w [H], cell_b [H]), lengths None or int64 [B].
    Returns (out [T, B, P] = hp[1:], h_n [B, P], c_n [B, H]) in x's dtype and, for backward,
    (hp [T+1, B, P], hs [T+1, B, H], cs [T+1, B, H], gates [T+1, B, G]) (module docstring)."""
    T, B, I = x.shape
    G, H, P = _dims(w_hh, w_hr)
    dt, sd, dev = x.dtype, config.state_dtype(x.dtype), x.device
    w_hh, w_hr = w_hh.contiguous(), w_hr.contiguous()
    x, lengths, (gw, gb, cw, cb), gates_buf, gates, xp, cs = forward_buffers(x, c0, w_ih, b_ih, b_hh, ln, lengths,
                                                                             save_gates=True)
    hp = alloc((T + 1, B, P), config.lstm_hs_dtype(dt), dev)
    hs = alloc((T + 1, B, H), config.lstm_hs_dtype(dt), dev)
    assert hp.dtype == dt == w_hh.dtype == w_hr.dtype, "hp, hs and the weights share x's dtype (cuBLAS out=)"
    hp[0].copy_(h0)
    hs[0].zero_()
    mm = alloc((B, G), dt, dev)
    cc = alloc((2, B, H), sd, dev)
    cc[0].copy_(c0)
    fma, ieee, upcast = dot_flags(w_hh.dtype, allow_tf32, dev)  # unused by the unfused kernel
    BB, BH, BK, nw = lstm_blocks(B, H, "fwd", False, ln is not None, dt, sm_count(dev))
    grid = (triton.cdiv(B, BB), triton.cdiv(H, BH))
    step = StepLauncher(lstm_fwd_kernel, grid, xp, None, mm, hs, cs, cc, gates, lengths, gw, gb, cw, cb, 0, B, H, eps,
                        FMA=fma, IEEE=ieee, UPCAST=upcast, BLOCK_B=BB, BLOCK_H=BH, BLOCK_K=BK, num_warps=nw)
    w_hh_t, w_hr_t = w_hh.t(), w_hr.t()  # once, not per step
    for t in range(T):
        torch.mm(hp[t], w_hh_t, out=mm)
        step(t)
        torch.mm(hs[t + 1], w_hr_t, out=hp[t + 1])
    return hp[1:], last_h(hp, lengths), cs[T].to(dt, copy=True), hp, hs, cs, gates_buf


@torch.no_grad()
def lstm_proj_bwd(dout: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor,
                  w_hh: torch.Tensor, w_hr: torch.Tensor, hp: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor,
                  gates: torch.Tensor, b_ih: Optional[torch.Tensor] = None, b_hh: Optional[torch.Tensor] = None,
                  ln: Optional[Sequence[torch.Tensor]] = None, lengths: Optional[torch.Tensor] = None,
                  eps: float = config.LN_EPS, allow_tf32: bool = False, need_dx: bool = True, need_dw: bool = True):
    """The backward of lstm_proj_fwd (module docstring). dout [T, B, P], dh_n [B, P], dc_n [B, H].
    Returns (dx [T, B, I] or None, dh0 [B, P], dc0 [B, H], dw_ih [G, I], dw_hh [G, P],
    dw_hr [P, H], db [G] (state dtype), dln (dgw, dgb, dcw, dcb) or None); the weight ones None
    unless need_dw."""
    T, B, I = x.shape
    G, H, P = _dims(w_hh, w_hr)
    dt, sd, dev = x.dtype, config.state_dtype(x.dtype), x.device
    w_hh, w_hr, dout = w_hh.contiguous(), w_hr.contiguous(), dout.contiguous()
    gw, gb, cw, cb = ln_args(ln, H)
    lengths = None if lengths is None else lengths.contiguous()
    assert tuple(gates.shape) == (T + 1, B, G) and gates.is_contiguous(), \
        f"gates: lstm_proj_fwd's [T+1={T + 1}, B={B}, G={G}] buffer expected, got {tuple(gates.shape)}"
    gd = config.grad_dtype(dt)
    assert gd == w_hh.dtype, "dG and W_hh share a dtype (cuBLAS out=)"

    dG = alloc((T + 1, B, G), gd, dev)
    dG[T].zero_()  # the carry into the last step is dh_n alone
    g_p = dh_n.to(sd, copy=True).contiguous()  # ĝ: the gradient carried into h_t, P wide
    dhp = alloc((T, B, P), sd, dev)  # dĥ_t: the whole gradient reaching h_t (0 where not valid)
    du = alloc((T, B, H), sd, dev)  # du_t = dĥ_t W_hr: the kernel's dout
    mm = alloc((B, P), gd, dev)
    w_hr_s = w_hr.to(sd)
    gh = torch.zeros((B, H), dtype=sd, device=dev)  # the kernel's carried dh: stays 0 (zero carry)
    carry = torch.zeros((B, H), dtype=w_hh.dtype, device=dev)
    gc = dc_n.to(sd, copy=True).contiguous()
    valid = None
    if lengths is not None:  # valid[t] = t < length, [T+1, B, 1]
        steps = torch.arange(T + 1, device=dev).unsqueeze(1)
        valid = (steps < lengths.clamp(max=T).unsqueeze(0)).unsqueeze(-1)
        invalid = ~valid
    BB, BH, BK, nw = lstm_blocks(B, H, "bwd", False, ln is not None, dt, sm_count(dev))
    nrb = triton.cdiv(B, BB)
    parts = ln_partials(ln, nrb, H, sd, dev)
    fma, ieee, upcast = dot_flags(w_hh.dtype, allow_tf32, dev)  # unused by the unfused kernel
    step = StepLauncher(lstm_bwd_kernel, (nrb, triton.cdiv(H, BH)), gates, None, carry, cs, du, dG, gh, gc, lengths, gw,
                        gb, cw, cb, *parts, 0, T, B, H, eps, FMA=fma, IEEE=ieee, UPCAST=upcast, BLOCK_B=BB, BLOCK_H=BH,
                        BLOCK_K=BK, num_warps=nw)
    for t in range(T - 1, -1, -1):
        torch.mm(dG[t + 1], w_hh, out=mm)  # slot T: zero
        if valid is None:
            if t < T - 1:  # every row runs on: the carry is dG_{t+1} W_hh alone
                g_p.copy_(mm)
            torch.add(dout[t], g_p, out=dhp[t])
        else:
            g_p.masked_fill_(valid[t + 1], 0.0).add_(mm)
            torch.add(dout[t], g_p, out=dhp[t]).masked_fill_(invalid[t], 0.0)
        torch.mm(dhp[t], w_hr_s, out=du[t])
        step(t)

    # hp in place of hs: dW_hh = Σ dG_tᵀ h_{t-1} (P wide), dh0 = dG_0 W_hh; g_p passes dh_n
    # through to h0 for a zero-length sequence
    dx, dh0, dw_ih, dw_hh, db = after_loop_grads(dG, g_p, x, hp, w_ih, w_hh, lengths, need_dx, need_dw)
    dw_hr = dln = None
    if need_dw:
        dw_hr = torch.mm(dhp.reshape(T * B, P).to(gd).t(), hs[1:].reshape(T * B, H).to(gd)).to(w_hr.dtype)
        if ln is not None:
            dln = ln_grads(parts, (gw, gb, cw, cb))
    return dx, dh0.to(dt), gc.to(dt), dw_ih, dw_hh, dw_hr, db, dln
