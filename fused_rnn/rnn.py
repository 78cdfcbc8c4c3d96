"""tanh (or ReLU) RNN over a whole sequence (one layer, one direction).

``rnn_sequence`` is the single entry point the layers call; it dispatches to the Triton
autograd Function or to the reference path.

The Triton path: ``RNNFunction`` calls the custom ops fused_rnn::rnn_fwd / rnn_bwd
(fused_rnn/_ops.py), which run the whole-sequence launchers of fused_rnn.kernels.rnn; the path
of their time loops (step, graph, persistent) is chosen in fused_rnn/_paths.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _ops
from ._backend import double_backward_via, resolve_backend, warn_once
from ._validate import check_nonlinearity, check_sequence_args
from .lstm import _allow_tf32, _request, _same_dtype
from .reference import rnn_sequence_ref


class RNNFunction(torch.autograd.Function):
    """One RNN layer, one direction, over a whole sequence, with a hand-written backward.
    Saves x, the weights and the state sequence hs [T+1, B, H] (the derivative of tanh and relu
    comes from the output, so no pre-activation is kept), and h0 (for ``reference``, as LSTMFunction's).
    ``path`` (optional, last): as LSTMFunction's."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, allow_tf32, fused, path="auto"):
        path = _request(path)
        out, h_n, hs = torch.ops.fused_rnn.rnn_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity,
                                                   allow_tf32, fused, path)
        ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, lengths, hs, h0)
        ctx.nonlinearity, ctx.allow_tf32, ctx.fused, ctx.path = nonlinearity, allow_tf32, fused, path
        return out, h_n

    @staticmethod
    def reference(ctx):
        """The forward's tensor inputs, as saved, and the reference path from them to the outputs."""
        x, w_ih, w_hh, b_ih, b_hh, lengths, _hs, h0 = ctx.saved_tensors

        def forward(x, h0, w_ih, w_hh, b_ih, b_hh):
            return rnn_sequence_ref(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, ctx.nonlinearity)

        return (x, h0, w_ih, w_hh, b_ih, b_hh), forward

    @staticmethod
    @double_backward_via(reference)
    def backward(ctx, dout, dh_n):
        x, w_ih, w_hh, b_ih, b_hh, lengths, hs, _h0 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dh0, dw_ih, dw_hh, db = torch.ops.fused_rnn.rnn_bwd(
            dout, dh_n, x, w_ih, w_hh, hs, lengths, ctx.nonlinearity, ctx.allow_tf32, ctx.fused,
            need[0], any(need[2:6]), ctx.path,
        )
        return (
            dx if need[0] else None,
            dh0 if need[1] else None,
            dw_ih if need[2] else None,
            dw_hh if need[3] else None,
            db.to(b_ih.dtype) if need[4] else None,
            db.to(b_hh.dtype) if need[5] else None,
            None, None, None, None, None,
        )


def rnn_sequence(
    x: torch.Tensor,
    h0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: Optional[torch.Tensor] = None,
    b_hh: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    nonlinearity: str = "tanh",
    backend: str = "auto",
):
    """x [T, B, I], h0 [B, H], w_ih [H, I], w_hh [H, H], b_* [H] or None,
    lengths None or [B] -> (out [T, B, H], h_n [B, H]). ``nonlinearity``: "tanh" or "relu".
    Arguments are checked as lstm_sequence's, alike on every backend; meta tensors run the
    reference path, shapes only."""
    check_nonlinearity(nonlinearity)
    lengths = check_sequence_args(x, h0, None, w_ih, w_hh, b_ih, b_hh, lengths=lengths, gates=1, backend=backend)
    if x.device.type != "meta" and resolve_backend(backend, x) == "triton":
        kernels = _ops.rnn_kernels()
        reason = kernels.unsupported(x, w_hh)
        if reason is None and not _same_dtype(x, (h0, w_ih, w_hh, b_ih, b_hh)):
            reason = "mixed dtypes"
        if reason is None:
            return RNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, _allow_tf32(x), True)
        warn_once(f"rnn:{reason}", f"fused_rnn: the RNN kernels cannot take {reason}; using the reference path")
    return rnn_sequence_ref(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity)
