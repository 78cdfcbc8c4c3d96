"""The tanh (or ReLU) RNN over a whole sequence (one layer, one direction): the custom ops
fused_rnn::rnn_fwd / rnn_bwd, their autograd Function and ``rnn_sequence``, the entry point the
layers call. The ops run the launchers of fused_rnn.kernels.rnn on the path fused_rnn._paths
resolves (step, graph, persistent), as fused_rnn/lstm.py's do.

(No ``from __future__ import annotations``: custom_op reads the real type hints.)
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _paths, aten
from ._backend import allow_tf32, aten_route, double_backward_via, resolve_backend, warn_once
from ._validate import check_nonlinearity, check_sequence_args, same_dtype
from .kernels import config
from .reference import rnn_sequence_ref


def _kernels():
    """fused_rnn.kernels.rnn, imported at the first launch: it imports Triton, which the
    reference path (and a machine without Triton) must not need."""
    from .kernels import rnn

    return rnn


@torch.library.custom_op("fused_rnn::rnn_fwd", mutates_args=())
def _rnn_fwd_op(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    lengths: Optional[Tensor], nonlinearity: str, allow_tf32: bool, fused: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> out [T,B,H], h_n [B,H] (x's dtype); hs [T+1,B,H] (state dtype)."""
    K = _kernels()

    def run(*a, plan=None):
        return K.rnn_fwd(*a, nonlinearity=nonlinearity, allow_tf32=allow_tf32, fused=fused, plan=plan)

    return _paths.launch(
        "rnn_fwd", path, x,
        lambda: K.persistent_plan("fwd", x.shape[1], w_hh.shape[1], fused, x.dtype, x.device, allow_tf32=allow_tf32),
        run, (x, h0, w_ih, w_hh, b_ih, b_hh, lengths), (nonlinearity, allow_tf32, fused), "rnn", w_hh.shape[1])


@_rnn_fwd_op.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, allow_tf32, fused, path="auto"):
    T, B, _I = x.shape
    H = w_hh.shape[1]
    sd = config.state_dtype(x.dtype)
    return x.new_empty((T, B, H)), x.new_empty((B, H)), x.new_empty((T + 1, B, H), dtype=sd)


@torch.library.custom_op("fused_rnn::rnn_bwd", mutates_args=())
def _rnn_bwd_op(
    dout: Tensor, dh_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, hs: Tensor, lengths: Optional[Tensor],
    nonlinearity: str, allow_tf32: bool, fused: bool, need_dx: bool, need_dw: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx [T,B,I] (or [0]), dh0 [B,H], dw_ih [H,I], dw_hh [H,H], db [H] (state dtype); the
    weight ones [0] when not need_dw."""
    K = _kernels()

    def run(*a, plan=None):
        return K.rnn_bwd(*a, nonlinearity=nonlinearity, allow_tf32=allow_tf32, fused=fused, need_dx=need_dx,
                         need_dw=need_dw, plan=plan)

    res = _paths.launch(
        "rnn_bwd", path, x,
        lambda: K.persistent_plan("bwd", x.shape[1], w_hh.shape[1], fused, x.dtype, x.device, allow_tf32=allow_tf32),
        run, (dout, dh_n, x, w_ih, w_hh, hs, lengths), (nonlinearity, allow_tf32, fused, need_dx, need_dw),
        "rnn", w_hh.shape[1])
    return _paths.or_empty(res, (x, x, w_ih, w_hh, hs))


@_rnn_bwd_op.register_fake
def _(dout, dh_n, x, w_ih, w_hh, hs, lengths, nonlinearity, allow_tf32, fused, need_dx, need_dw, path="auto"):
    dx, dw, db, _ = _paths.fake_grads(x, need_dx, need_dw, (w_ih, w_hh))
    return (dx, x.new_empty((x.shape[1], w_hh.shape[1])), *dw, db)


class RNNFunction(torch.autograd.Function):
    """One RNN layer, one direction, over a whole sequence, with a hand-written backward.
    Saves x, the weights and the state sequence hs [T+1, B, H] (the derivative of tanh and relu
    comes from the output, so no pre-activation is kept), and h0 (for ``reference``, as
    LSTMFunction's). ``path`` (optional, last): as LSTMFunction's."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, allow_tf32, fused, path="auto"):
        path = _paths.forward_request(path)
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
        grads = (dx, dh0, dw_ih, dw_hh, db.to(x.dtype if b_ih is None else b_ih.dtype),
                 db.to(x.dtype if b_hh is None else b_hh.dtype))
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 5


def rnn_sequence(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                 b_hh: Optional[Tensor] = None, lengths: Optional[Tensor] = None, nonlinearity: str = "tanh",
                 backend: str = "auto"):
    """x [T, B, I], h0 [B, H], w_ih [H, I], w_hh [H, H], b_* [H] or None,
    lengths None or [B] -> (out [T, B, H], h_n [B, H]). ``nonlinearity``: "tanh" or "relu".
    Arguments are checked as lstm_sequence's, alike on every backend; meta tensors run the
    reference path, shapes only. "auto" on CPU tensors runs torch's ATen op
    (fused_rnn.aten.single_layer) where it takes the arguments, else the reference path."""
    check_nonlinearity(nonlinearity)
    lengths = check_sequence_args(x, h0, None, w_ih, w_hh, b_ih, b_hh, lengths=lengths, gates=1, backend=backend)
    if aten_route(backend, x):  # auto on a CPU tensor: torch's own ATen op (None: the reference loop)
        done = aten.single_layer(f"RNN_{nonlinearity.upper()}", x, (h0,), [w_ih, w_hh, b_ih, b_hh], lengths)
        if done is not None:
            return done
    if x.device.type != "meta" and resolve_backend(backend, x) == "triton":
        reason = _kernels().unsupported(x, w_hh)
        if reason is None and not same_dtype(x, (h0, w_ih, w_hh, b_ih, b_hh)):
            reason = "mixed dtypes"
        if reason is None:
            return RNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, allow_tf32(x), True)
        warn_once(f"rnn:{reason}", f"fused_rnn: the RNN kernels cannot take {reason}; using the reference path")
    return rnn_sequence_ref(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity)
