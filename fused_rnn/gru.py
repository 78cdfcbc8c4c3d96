"""The GRU over a whole sequence (one layer, one direction): the custom ops fused_rnn::gru_fwd /
gru_bwd, their autograd Function and ``gru_sequence``, the entry point the layers call. The ops
run the launchers of fused_rnn.kernels.gru on the path fused_rnn._paths resolves (step or graph;
the GRU has no persistent kernel, so "persistent" runs the step loop), as fused_rnn/rnn.py's do.

(No ``from __future__ import annotations``: custom_op reads the real type hints.)
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _paths, aten
from ._backend import allow_tf32, aten_route, double_backward_via, resolve_backend, warn_once
from ._validate import check_sequence_args, same_dtype
from .kernels import config
from .reference import gru_sequence_ref


def _kernels():
    """fused_rnn.kernels.gru, imported at the first launch: it imports Triton, which the
    reference path (and a machine without Triton) must not need."""
    from .kernels import gru

    return gru


@torch.library.custom_op("fused_rnn::gru_fwd", mutates_args=())
def _gru_fwd_op(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    lengths: Optional[Tensor], allow_tf32: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> out [T,B,H], h_n [B,H] (x's dtype); hs [T+1,B,H], gates [T,B,4H] (state dtype)."""
    K = _kernels()

    def run(*a, plan=None):
        return K.gru_fwd(*a, allow_tf32=allow_tf32, plan=plan)

    return _paths.launch("gru_fwd", path, x, K.persistent_plan, run, (x, h0, w_ih, w_hh, b_ih, b_hh, lengths),
                         (allow_tf32,), "gru", w_hh.shape[1])


@_gru_fwd_op.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, allow_tf32, path="auto"):
    T, B, _I = x.shape
    H = w_hh.shape[1]
    sd = config.state_dtype(x.dtype)
    return (x.new_empty((T, B, H)), x.new_empty((B, H)), x.new_empty((T + 1, B, H), dtype=sd),
            x.new_empty((T, B, 4 * H), dtype=sd))


@torch.library.custom_op("fused_rnn::gru_bwd", mutates_args=())
def _gru_bwd_op(
    dout: Tensor, dh_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, hs: Tensor, gates: Tensor,
    lengths: Optional[Tensor], allow_tf32: bool, need_dx: bool, need_dw: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx [T,B,I] (or [0]), dh0 [B,H], dw_ih [3H,I], dw_hh [3H,H], db_ih, db_hh [3H] (state
    dtype); the weight ones [0] when not need_dw."""
    K = _kernels()

    def run(*a, plan=None):
        return K.gru_bwd(*a, allow_tf32=allow_tf32, need_dx=need_dx, need_dw=need_dw, plan=plan)

    res = _paths.launch("gru_bwd", path, x, K.persistent_plan, run, (dout, dh_n, x, w_ih, w_hh, hs, gates, lengths),
                        (allow_tf32, need_dx, need_dw), "gru", w_hh.shape[1])
    return _paths.or_empty(res, (x, x, w_ih, w_hh, hs, hs))


@_gru_bwd_op.register_fake
def _(dout, dh_n, x, w_ih, w_hh, hs, gates, lengths, allow_tf32, need_dx, need_dw, path="auto"):
    dx, dw, db, _ = _paths.fake_grads(x, need_dx, need_dw, (w_ih, w_hh))
    return (dx, x.new_empty((x.shape[1], w_hh.shape[1])), *dw, db, torch.empty_like(db))


class GRUFunction(torch.autograd.Function):
    """One GRU layer, one direction, over a whole sequence, with a hand-written backward.
    Saves x, the weights, the state sequence hs [T+1, B, H], the gates r, z, n, hn [T, B, 4H]
    (recomputing them would take the recurrent matmul again), and h0 (for ``reference``, as
    LSTMFunction's). ``path`` (optional, last): as LSTMFunction's."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, allow_tf32, path="auto"):
        path = _paths.forward_request(path)
        out, h_n, hs, gates = torch.ops.fused_rnn.gru_fwd(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, allow_tf32, path)
        ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, lengths, hs, gates, h0)
        ctx.allow_tf32, ctx.path = allow_tf32, path
        return out, h_n

    @staticmethod
    def reference(ctx):
        """The forward's tensor inputs, as saved, and the reference path from them to the outputs."""
        x, w_ih, w_hh, b_ih, b_hh, lengths, _hs, _gates, h0 = ctx.saved_tensors

        def forward(x, h0, w_ih, w_hh, b_ih, b_hh):
            return gru_sequence_ref(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)

        return (x, h0, w_ih, w_hh, b_ih, b_hh), forward

    @staticmethod
    @double_backward_via(reference)
    def backward(ctx, dout, dh_n):
        x, w_ih, w_hh, b_ih, b_hh, lengths, hs, gates, _h0 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = torch.ops.fused_rnn.gru_bwd(
            dout, dh_n, x, w_ih, w_hh, hs, gates, lengths, ctx.allow_tf32, need[0], any(need[2:6]), ctx.path)
        grads = (dx, dh0, dw_ih, dw_hh, db_ih.to(x.dtype if b_ih is None else b_ih.dtype),
                 db_hh.to(x.dtype if b_hh is None else b_hh.dtype))
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 3


def gru_sequence(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                 b_hh: Optional[Tensor] = None, lengths: Optional[Tensor] = None, backend: str = "auto"):
    """x [T, B, I], h0 [B, H], w_ih [3H, I], w_hh [3H, H], b_* [3H] or None (gates r, z, n, as
    torch.nn.GRU), lengths None or [B] -> (out [T, B, H], h_n [B, H]). Arguments are checked as
    lstm_sequence's, alike on every backend; meta tensors run the reference path, shapes only."""
    lengths = check_sequence_args(x, h0, None, w_ih, w_hh, b_ih, b_hh, lengths=lengths, gates=3, backend=backend)
    if aten_route(backend, x):  # auto on a CPU tensor: torch's own ATen op (None: the reference loop)
        done = aten.single_layer("GRU", x, (h0,), [w_ih, w_hh, b_ih, b_hh], lengths)
        if done is not None:
            return done
    if x.device.type != "meta" and resolve_backend(backend, x) == "triton":
        reason = _kernels().unsupported(x, w_hh)
        if reason is None and not same_dtype(x, (h0, w_ih, w_hh, b_ih, b_hh)):
            reason = "mixed dtypes"
        if reason is None:
            return GRUFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, allow_tf32(x))
        warn_once(f"gru:{reason}", f"fused_rnn: the GRU kernels cannot take {reason}; using the reference path")
    return gru_sequence_ref(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
