"""The whole-sequence LSTM and layer-norm LSTM on the CPU, in torch ops: the route
``backend="auto"`` takes on CPU tensors where torch.nn has no op (layer norm, fused_rnn.lstm's
routing says where else).

The structure of kernels/lstm.py: one input-projection GEMM for all T steps; per step one addmm
(h W_hhᵀ) and the gate / LayerNorm math in a few in-place and out= torch ops, saving what the
backward reads; a hand-written backward that runs the reverse loop per step, then the weight,
bias, LayerNorm-parameter and input gradients as a few GEMMs and reductions over all T·B rows.
Semantics are fused_rnn.reference.lstm_sequence_ref's (its oracle), variable lengths included;
under create_graph=True the backward is the reference path's (_backend.double_backward_via).
Letters: T time, B batch, I input, H hidden, G = 4H (gate order i, f, g, o).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._backend import double_backward_via
from .kernels import config
from .reference import lstm_sequence_ref

DTYPES = (torch.float32, torch.float64)  # 16-bit inputs keep the reference loop (it upcasts)

_ln_backward = torch.ops.aten.native_layer_norm_backward


def supported(x: Tensor, tensors) -> bool:
    """Whether the route takes these arguments: fp32 or fp64, every tensor in x's dtype, not
    under CPU autocast (whose lower-precision GEMMs would not fit the buffers), at least one step
    (T = 0 has nothing to route: the reference returns the initial states)."""
    return (x.dtype in DTYPES and x.shape[0] > 0 and all(t is None or t.dtype == x.dtype for t in tensors)
            and not torch.is_autocast_enabled("cpu"))


def _bias(b_ih, b_hh):
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


class CPULSTMFunction(torch.autograd.Function):
    """One LSTM layer (layer norm optional), one direction, over a whole sequence on the CPU.

    Saves x, the weights, h0, c0, the pre-activations a [T, B, G] (before LayerNorm), the
    activations [T, B, G], hs, cs [T+1, B, H] (slot 0 the initial state), tanh of the cell
    output [T, B, H] and the LayerNorms' means and rstds."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, eps):
        T, B, I = x.shape
        G, H = w_hh.shape
        ln = gw is not None
        xz = config.zero_padding(x, lengths)
        a = x.new_empty(T, B, G)
        bias = _bias(b_ih, b_hh)
        if bias is None:
            torch.mm(xz.reshape(T * B, I), w_ih.t(), out=a.view(T * B, G))
        else:
            torch.addmm(bias, xz.reshape(T * B, I), w_ih.t(), out=a.view(T * B, G))
        acts = torch.empty_like(a)
        hs, cs = x.new_empty(T + 1, B, H), x.new_empty(T + 1, B, H)
        hs[0], cs[0] = h0, c0
        tz = x.new_empty(T, B, H)  # tanh of the cell output (c_t, or LN_c(c_t))
        invalid = None if lengths is None else _invalid(T, lengths)
        w_hh_t = w_hh.t()
        stats = []
        if ln:  # tanh(v) = 2 sigmoid(2v) - 1: one sigmoid for all four gates (tanh costs ~3x)
            two = torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=x.dtype).view(4, 1)
            gw2, gb2, cw2, cb2 = gw.view(4, H) * two, gb.view(4, H) * two, cw * 2, cb * 2
        # per-step views, made once (indexing in the loop costs a few µs a step)
        a_s, act_s = a.view(T, B, 4, H).unbind(0), acts.view(T, B, 4, H).unbind(0)
        hs_s, cs_s, tz_s = hs.unbind(0), cs.unbind(0), tz.unbind(0)
        for t in range(T):
            a_t, act, tz_t = a_s[t], act_s[t], tz_s[t]
            a_t.view(B, G).addmm_(hs_s[t], w_hh_t)
            if ln:
                yhat, mg, rg = torch.native_layer_norm(a_t, (H,), None, None, eps)
                torch.sigmoid(torch.addcmul(gb2, yhat, gw2), out=act)
                act[:, 2].mul_(2).sub_(1)
            else:
                torch.sigmoid(a_t, out=act)  # (g's sigmoid overwritten by its tanh)
                torch.tanh(a_t[:, 2], out=act[:, 2])
            i, f, g, o = act.unbind(1)
            c_new = torch.mul(f, cs_s[t], out=cs_s[t + 1] if invalid is None else None)
            c_new.addcmul_(i, g)
            if ln:
                z2, mc, rc = torch.native_layer_norm(c_new, (H,), cw2, cb2, eps)
                torch.sigmoid(z2, out=tz_t).mul_(2).sub_(1)
                stats.append((mg, rg, mc, rc))
            else:
                torch.tanh(c_new, out=tz_t)
            if invalid is None:
                torch.mul(o, tz_t, out=hs_s[t + 1])
            else:  # past a sequence's end h and c keep their values
                torch.where(invalid[t], hs_s[t], o * tz_t, out=hs_s[t + 1])
                torch.where(invalid[t], cs_s[t], c_new, out=cs_s[t + 1])
        out = hs[1:] if invalid is None else hs[1:].masked_fill(invalid, 0.0)
        mg, rg, mc, rc = (torch.stack(s) for s in zip(*stats)) if stats else (None,) * 4
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths,
                              a, acts, hs, cs, tz, mg, rg, mc, rc)
        ctx.eps = eps
        return out, hs[T].clone(), cs[T].clone()

    @staticmethod
    def reference(ctx):
        """The forward's tensor inputs, as saved, and the reference path from them to the outputs."""
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths = ctx.saved_tensors[:12]

        def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb):
            ln = None if gw is None else (gw, gb, cw, cb)
            return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, ctx.eps)

        return (x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb), forward

    # Reverse step t (kernels/lstm.py's derivative; gh, gc the gradients of the carried h_t, c_t,
    # starting at dh_n, dc_n; valid_t = t < length; ẑ, â_q the normalised c_t and pre-activations):
    #   dh = valid_t (dout_t + gh);   dz = dh o (1 - tanh² z);   dy_o = dh tanh(z) o (1 - o)
    #   dc = valid_t (gc + (dz, or LNback(dz γ_c)));   gc ← valid_t dc f + [not valid_t] gc
    #   dy_i = dc g i (1 - i),  dy_f = dc c_{t-1} f (1 - f),  dy_g = dc i (1 - g²)
    #   dG_t = dy, or LNback_q(dy_q γ_q);   gh ← dG_t W_hh + [not valid_t] gh
    # LNback (ATen's native_layer_norm_backward) = rstd (dv̂ − mean(dv̂) − v̂ mean(dv̂ v̂)).
    # After the loop: dW_ih = dGᵀ x, dW_hh = dGᵀ h_{t-1}, db = Σ dG, dx = dG W_ih,
    # dγ_q = Σ dy_q â_q, dβ_q = Σ dy_q, dγ_c = Σ dz ẑ, dβ_c = Σ dz (sums over all T·B rows).
    @staticmethod
    @double_backward_via(reference)
    def backward(ctx, dout, dh_n, dc_n):
        (x, _h0, _c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths,
         a, acts, hs, cs, tz, mg, rg, mc, rc) = ctx.saved_tensors
        need = ctx.needs_input_grad
        T, B, I = x.shape
        G, H = w_hh.shape
        ln = gw is not None
        invalid = None if lengths is None else _invalid(T, lengths)
        i, f, g, o = acts.view(T, B, 4, H).unbind(2)
        # the per-step factors, for all steps at once: dy_{i,f,g} = dc q, dy_o = dh po
        kz = o * (1 - tz * tz)
        q = torch.stack((g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g), tz * o * (1 - o)), dim=2)
        kc = kz * cw if ln else kz
        dhs = torch.empty_like(tz)
        dG = acts.new_empty(T, B, G)
        dy = acts.new_empty(T, B, 4, H) if ln else dG.view(T, B, 4, H)  # the gate gradients before LN
        gw4 = gw.view(4, H) if ln else None
        dhs_s, dy_s, dG_s = dhs.unbind(0), dy.unbind(0), dG.unbind(0)
        q_s, kc_s, f_s = q.unbind(0), kc.unbind(0), f.unbind(0)
        dout_s, cs_s, a_s = dout.unbind(0), cs.unbind(0), a.view(T, B, 4, H).unbind(0)
        mg_s, rg_s, mc_s, rc_s = (s.unbind(0) for s in (mg, rg, mc, rc)) if ln else (None,) * 4
        gh, gc = dh_n.clone(), dc_n.clone()
        for t in range(T - 1, -1, -1):
            dh = torch.add(dout_s[t], gh, out=dhs_s[t])
            if invalid is not None:
                dh.masked_fill_(invalid[t], 0.0)
            if ln:
                dc = _ln_backward(dh * kc_s[t], cs_s[t + 1], (H,), mc_s[t], rc_s[t], None, None,
                                  [True, False, False])[0].add_(gc)
            else:
                dc = torch.addcmul(gc, dh, kc_s[t])
            if invalid is not None:
                dc.masked_fill_(invalid[t], 0.0)
            dy_t = dy_s[t]
            torch.mul(dc.unsqueeze(1), q_s[t][:, :3], out=dy_t[:, :3])
            torch.mul(dh, q_s[t][:, 3], out=dy_t[:, 3])
            if ln:
                dG_s[t].copy_(_ln_backward(dy_t * gw4, a_s[t], (H,), mg_s[t], rg_s[t], None, None,
                                           [True, False, False])[0].view(B, G))
            gh_new = torch.mm(dG_s[t], w_hh)
            gc_new = dc * f_s[t]
            if invalid is not None:
                gc_new = torch.where(invalid[t], gc, gc_new)
                gh_new = torch.where(invalid[t], gh, gh_new)
            gh, gc = gh_new, gc_new
        dG2 = dG.view(T * B, G)
        dx = torch.mm(dG2, w_ih).view(T, B, I) if need[0] else None
        dw_ih = torch.mm(dG2.t(), config.zero_padding(x, lengths).reshape(T * B, I)) if need[3] else None
        dw_hh = torch.mm(dG2.t(), hs[:-1].reshape(T * B, H)) if need[4] else None
        db = dG2.sum(0) if need[5] or need[6] else None
        dln = (None,) * 4
        if ln and any(need[7:11]):
            dz = dhs * kz
            dln = ((dy * ((a.view(T, B, 4, H) - mg) * rg)).sum((0, 1)).view(G), dy.sum((0, 1)).view(G),
                   (dz * ((cs[1:] - mc) * rc)).sum((0, 1)), dz.sum((0, 1)))
        grads = (dx, gh, gc, dw_ih, dw_hh, db, db) + dln
        return tuple(gr if n else None for gr, n in zip(grads, need)) + (None, None)


def _invalid(T: int, lengths: Tensor) -> Tensor:
    """[T, B, 1] bool: True where step t is past sequence b's end."""
    return (torch.arange(T).unsqueeze(1) >= lengths.to("cpu").unsqueeze(0)).unsqueeze(-1)


def lstm_sequence_cpu(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                      b_hh: Optional[Tensor], ln: Optional[Tuple[Tensor, ...]], lengths: Optional[Tensor],
                      eps: float = config.LN_EPS):
    """lstm_sequence_ref's arguments and results (no projection) through CPULSTMFunction, or None
    where ``supported`` refuses them (the caller runs the reference loop)."""
    if not supported(x, (h0, c0, w_ih, w_hh, b_ih, b_hh) + tuple(ln or ())):
        return None
    gw, gb, cw, cb = ln if ln is not None else (None,) * 4
    return CPULSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, eps)
