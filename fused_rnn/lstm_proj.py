"""The LSTM with projections (torch.nn.LSTM's proj_size; plain or layer-norm), one layer, one
direction: the custom ops fused_rnn::lstm_proj_fwd / lstm_proj_bwd and their autograd Function,
which fused_rnn.lstm.lstm_sequence calls when given ``w_hr``. The ops run the launchers of
fused_rnn.kernels.lstm_proj (cuBLAS products around the unfused LSTM pointwise kernels) on the
step or the graph path (no persistent kernel takes proj_size).

(No ``from __future__ import annotations``: custom_op reads the real type hints.)
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _paths
from ._backend import double_backward_via
from .kernels import config
from .reference import lstm_sequence_ref


def _kernels():
    """fused_rnn.kernels.lstm_proj, imported at the first launch: it imports Triton, which the
    reference path (and a machine without Triton) must not need."""
    from .kernels import lstm_proj

    return lstm_proj


def _no_persistent_plan():
    return None, "no persistent kernel takes proj_size"


def _ln(gw, gb, cw, cb):
    return None if gw is None else (gw, gb, cw, cb)


@torch.library.custom_op("fused_rnn::lstm_proj_fwd", mutates_args=())
def _lstm_proj_fwd_op(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_gw: Optional[Tensor], ln_gb: Optional[Tensor], ln_cw: Optional[Tensor], ln_cb: Optional[Tensor],
    lengths: Optional[Tensor], eps: float, allow_tf32: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> h_n [B,P], c_n [B,H] (x's dtype); hp [T+1,B,P], hs [T+1,B,H], cs [T+1,B,H], gates
    [T+1,B,4H] (kernels/lstm_proj.py). The output sequence is the view hp[1:]."""
    K = _kernels()

    def run(*a, plan=None):  # the launcher without its out (= hp[1:])
        return K.lstm_proj_fwd(*a, eps=eps, allow_tf32=allow_tf32)[1:]

    return _paths.launch("lstm_proj_fwd", path, x, _no_persistent_plan, run,
                         (x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, _ln(ln_gw, ln_gb, ln_cw, ln_cb), lengths),
                         (eps, allow_tf32), "lstm_proj", w_hh.shape[0] // 4)


@_lstm_proj_fwd_op.register_fake
def _(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths, eps, allow_tf32, path="auto"):
    T, B, _I = x.shape
    G, P = w_hh.shape
    H = G // 4
    ln = ln_gw is not None
    return (
        x.new_empty((B, P)), x.new_empty((B, H)),
        x.new_empty((T + 1, B, P), dtype=config.lstm_hs_dtype(x.dtype)),
        x.new_empty((T + 1, B, H), dtype=config.lstm_hs_dtype(x.dtype)),
        x.new_empty((T + 1, B, H), dtype=config.lstm_cs_dtype(x.dtype, ln)),
        x.new_empty((T + 1, B, G), dtype=config.lstm_gates_dtype(x.dtype, ln)),
    )


@torch.library.custom_op("fused_rnn::lstm_proj_bwd", mutates_args=())
def _lstm_proj_bwd_op(
    dout: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Tensor,
    hp: Tensor, hs: Tensor, cs: Tensor, gates: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_gw: Optional[Tensor], ln_gb: Optional[Tensor], ln_cw: Optional[Tensor], ln_cb: Optional[Tensor],
    lengths: Optional[Tensor], eps: float, allow_tf32: bool, need_dx: bool, need_dw: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx [T,B,I] (or [0]), dh0 [B,P], dc0 [B,H], dw_ih [4H,I], dw_hh [4H,P], dw_hr [P,H],
    db [4H] (state dtype), dln_gw [4H], dln_gb [4H], dln_cw [H], dln_cb [H]; the weight ones [0]
    when not need_dw, the LN ones [0] without LN. Reads its inputs, writes none of them."""
    K = _kernels()

    def run(*a, plan=None):
        return K.lstm_proj_bwd(*a, eps=eps, allow_tf32=allow_tf32, need_dx=need_dx, need_dw=need_dw)

    dx, dh0, dc0, dw_ih, dw_hh, dw_hr, db, dln = _paths.launch(
        "lstm_proj_bwd", path, x, _no_persistent_plan, run,
        (dout, dh_n, dc_n, x, w_ih, w_hh, w_hr, hp, hs, cs, gates, b_ih, b_hh, _ln(ln_gw, ln_gb, ln_cw, ln_cb),
         lengths), (eps, allow_tf32, need_dx, need_dw), "lstm_proj", w_hr.shape[1])
    sd = x.new_empty(0, dtype=config.state_dtype(x.dtype))
    return _paths.or_empty((dx, dh0, dc0, dw_ih, dw_hh, dw_hr, db, *(dln or (None,) * 4)),
                           (x, x, x, w_ih, w_hh, w_hr, sd, x, x, x, x))


@_lstm_proj_bwd_op.register_fake
def _(dout, dh_n, dc_n, x, w_ih, w_hh, w_hr, hp, hs, cs, gates, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths,
      eps, allow_tf32, need_dx, need_dw, path="auto"):
    dx, dw, db, dln = _paths.fake_grads(x, need_dx, need_dw, (w_ih, w_hh, w_hr), (ln_gw, ln_gb, ln_cw, ln_cb))
    B, P, H = x.shape[1], w_hh.shape[1], w_hr.shape[1]
    return (dx, x.new_empty((B, P)), x.new_empty((B, H)), *dw, db, *dln)


class LSTMProjFunction(torch.autograd.Function):
    """One layer, one direction of the LSTM with projections, with a hand-written backward.
    Saves x, the weights, hp [T+1, B, P] (hp[1:] is the output), hs, cs [T+1, B, H], the gates
    [T+1, B, 4H], and h0, c0 (for ``reference``, as LSTMFunction's); the backward reads them and
    writes none (so a second backward of the same graph needs nothing special)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb, lengths, eps, allow_tf32, path="auto"):
        path = _paths.forward_request(path)
        h_n, c_n, hp, hs, cs, gates = torch.ops.fused_rnn.lstm_proj_fwd(
            x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb, lengths, eps, allow_tf32, path)
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb, lengths, hp, hs, cs, gates, h0, c0)
        ctx.eps, ctx.allow_tf32, ctx.path = eps, allow_tf32, path
        return hp[1:], h_n, c_n  # the output is the saved hp (as LSTMFunction's is hs)

    @staticmethod
    def reference(ctx):
        """The forward's tensor inputs, as saved, and the reference path from them to the outputs."""
        x, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb, lengths, *_sequences, h0, c0 = ctx.saved_tensors

        def forward(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb):
            return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ln(gw, gb, cw, cb), lengths, ctx.eps, w_hr)

        return (x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb), forward

    @staticmethod
    @double_backward_via(reference)
    def backward(ctx, dout, dh_n, dc_n):
        x, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb, lengths, hp, hs, cs, gates, _h0, _c0 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dh0, dc0, dw_ih, dw_hh, dw_hr, db, dgw, dgb, dcw, dcb = torch.ops.fused_rnn.lstm_proj_bwd(
            dout, dh_n, dc_n, x, w_ih, w_hh, w_hr, hp, hs, cs, gates, b_ih, b_hh, gw, gb, cw, cb, lengths,
            ctx.eps, ctx.allow_tf32, need[0], any(need[3:12]), ctx.path)
        grads = (dx, dh0, dc0, dw_ih, dw_hh, dw_hr, db.to(x.dtype if b_ih is None else b_ih.dtype),
                 db.to(x.dtype if b_hh is None else b_hh.dtype), dgw, dgb, dcw, dcb)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4
