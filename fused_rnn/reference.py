"""Reference path: plain PyTorch time loops.

This is both the CPU fallback and the oracle every kernel is tested against. It computes in fp32
(fp64 stays fp64) whatever the storage dtype, and casts the results back to the input's dtype.

Dimension letters: T time, B batch, I input features, H hidden, G = 4H (LSTM gates, order i, f, g, o;
the GRU's 3H, order r, z, n).
All sequences are time-major: x is [T, B, I].

Variable lengths: ``lengths`` is an int64 tensor [B]; at steps t >= lengths[b] sequence b keeps its
state unchanged and its output row is zero, so h_n / c_n are the states at its last valid step.
Whatever x holds there (NaN, Inf) reaches no result and no gradient (zero_padding).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import config


def _input_projection(x, w_ih, b_ih, b_hh, acc):
    """x W_ihᵀ + b_ih + b_hh for all T steps in one GEMM: [T, B, G]."""
    bias = None
    if b_ih is not None:
        bias = b_ih.to(acc)
    if b_hh is not None:
        bias = b_hh.to(acc) if bias is None else bias + b_hh.to(acc)
    return F.linear(x.to(acc), w_ih.to(acc), bias)


def _layer_norm_rows(v, weight, bias, eps):
    """LayerNorm over the last dim of v with a (weight, bias) per leading group.

    v: [..., K, H]; weight, bias: [K * H]. Each of the K groups of H is normalised on its own.
    """
    H = v.shape[-1]
    mean = v.mean(dim=-1, keepdim=True)
    var = (v - mean).pow(2).mean(dim=-1, keepdim=True)
    vhat = (v - mean) * torch.rsqrt(var + eps)
    shape = (-1, H) if v.dim() >= 2 else (H,)
    return vhat * weight.reshape(shape) + bias.reshape(shape)


def lstm_cell_ref(gates, c, ln=None, eps: float = config.LN_EPS):
    """The LSTM pointwise update from gate pre-activations [B, 4H] and c_{t-1} [B, H].

    ``ln``: None, or (gate_weight [4H], gate_bias [4H], cell_weight [H], cell_bias [H]) for the
    seed's layer-norm LSTM: each of the four gate pre-activations is layer-normed, and c_t is
    layer-normed before the output tanh, while the state keeps the un-normalised c_t.
    Returns (h_t, c_t) in the dtype of ``gates``.
    """
    B, G = gates.shape
    H = G // 4
    if ln is not None:
        gw, gb, cw, cb = ln
        gates = _layer_norm_rows(gates.view(B, 4, H), gw.to(gates.dtype), gb.to(gates.dtype), eps)
        gates = gates.reshape(B, G)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    c_out = c_new
    if ln is not None:
        c_out = F.layer_norm(c_new, (H,), cw.to(c_new.dtype), cb.to(c_new.dtype), eps)
    h_new = torch.sigmoid(o) * torch.tanh(c_out)
    return h_new, c_new


def rnn_cell_ref(pre, nonlinearity: str = "tanh"):
    """The RNN step from its pre-activation [B, H]."""
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    if nonlinearity == "relu":
        return torch.relu(pre)
    raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")


def gru_cell_ref(xp, hp, h):
    """The GRU step (torch.nn's math) from xp = x W_ihᵀ + b_ih and hp = h W_hhᵀ + b_hh, both
    [B, 3H] in the order r, z, n, and h_{t-1} [B, H]: r, z = σ(xp_r + hp_r), σ(xp_z + hp_z);
    n = tanh(xp_n + r hp_n) (b_hn inside the reset product); h_t = (1 − z) n + z h_{t-1}."""
    xr, xz, xn = xp.chunk(3, dim=-1)
    hr, hz, hn = hp.chunk(3, dim=-1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def _masked_update(t, lengths, new, old):
    if lengths is None:
        return new, new
    m = (t < lengths).unsqueeze(1)
    return torch.where(m, new, old), torch.where(m, new, torch.zeros_like(new))


def lstm_sequence_ref(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                      b_hh: Optional[Tensor] = None, ln: Optional[Tuple[Tensor, ...]] = None,
                      lengths: Optional[Tensor] = None, eps: float = config.LN_EPS, w_hr: Optional[Tensor] = None):
    """One LSTM layer, one direction. x [T, B, I], h0/c0 [B, H] -> (out [T, B, H], h_n, c_n).

    ``w_hr`` [P, H] (torch.nn.LSTM's ``proj_size`` P < H): the LSTM with projections. The state
    h_t = W_hr (o_t * tanh(c_t)) is P wide, so h0 and h_n are [B, P], w_hh is [4H, P] and out is
    [T, B, P]; c stays H wide.
    """
    acc = config.state_dtype(x.dtype)  # fp64 stays fp64, the rest runs in fp32
    T = x.shape[0]
    xp = _input_projection(config.zero_padding(x, lengths), w_ih, b_ih, b_hh, acc)
    w_hh_t = w_hh.to(acc).t()
    w_hr_t = None if w_hr is None else w_hr.to(acc).t()
    ln_acc = None if ln is None else tuple(p.to(acc) for p in ln)
    h, c = h0.to(acc), c0.to(acc)
    outs = []
    for t in range(T):
        h_new, c_new = lstm_cell_ref(xp[t] + h @ w_hh_t, c, ln_acc, eps)
        if w_hr_t is not None:
            h_new = h_new @ w_hr_t
        h, out_t = _masked_update(t, lengths, h_new, h)
        c, _ = _masked_update(t, lengths, c_new, c)
        outs.append(out_t)
    out = torch.stack(outs) if outs else xp.new_zeros(0, x.shape[1], w_hh.shape[1])
    return out.to(x.dtype), h.to(x.dtype), c.to(x.dtype)


def rnn_sequence_ref(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                     b_hh: Optional[Tensor] = None, lengths: Optional[Tensor] = None, nonlinearity: str = "tanh"):
    """One RNN layer, one direction. x [T, B, I], h0 [B, H] -> (out [T, B, H], h_n)."""
    acc = config.state_dtype(x.dtype)  # fp64 stays fp64, the rest runs in fp32
    T = x.shape[0]
    xp = _input_projection(config.zero_padding(x, lengths), w_ih, b_ih, b_hh, acc)
    w_hh_t = w_hh.to(acc).t()
    h = h0.to(acc)
    outs = []
    for t in range(T):
        h_new = rnn_cell_ref(xp[t] + h @ w_hh_t, nonlinearity)
        h, out_t = _masked_update(t, lengths, h_new, h)
        outs.append(out_t)
    out = torch.stack(outs) if outs else xp.new_zeros(0, x.shape[1], w_hh.shape[1])
    return out.to(x.dtype), h.to(x.dtype)


def gru_sequence_ref(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                     b_hh: Optional[Tensor] = None, lengths: Optional[Tensor] = None):
    """One GRU layer, one direction. x [T, B, I], h0 [B, H], w_ih / w_hh [3H, I] / [3H, H]
    -> (out [T, B, H], h_n)."""
    acc = config.state_dtype(x.dtype)  # fp64 stays fp64, the rest runs in fp32
    T = x.shape[0]
    xp = _input_projection(config.zero_padding(x, lengths), w_ih, b_ih, None, acc)  # b_hh: in hp
    w_hh_t = w_hh.to(acc).t()
    b = None if b_hh is None else b_hh.to(acc)
    h = h0.to(acc)
    outs = []
    for t in range(T):
        hp = h @ w_hh_t if b is None else torch.addmm(b, h, w_hh_t)
        h, out_t = _masked_update(t, lengths, gru_cell_ref(xp[t], hp, h), h)
        outs.append(out_t)
    out = torch.stack(outs) if outs else xp.new_zeros(0, x.shape[1], w_hh.shape[1])
    return out.to(x.dtype), h.to(x.dtype)
