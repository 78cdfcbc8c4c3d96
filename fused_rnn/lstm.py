"""LSTM and layer-norm LSTM over a whole sequence (one layer, one direction).

``lstm_sequence`` is the single entry point the layers call; it dispatches to the Triton
autograd Function or to the reference path.

The Triton path: ``LSTMFunction`` calls the custom ops fused_rnn::lstm_fwd / lstm_bwd
(fused_rnn/_ops.py), which run the whole-sequence launchers of fused_rnn.kernels.lstm: one input
projection GEMM, a time loop of fused step kernels, and in backward a reverse loop of fused step
kernels followed by a few large GEMMs for dx, dW_ih, dW_hh and the biases. Which implementation
runs the time loops (eager step launches, a replayed CUDA graph of them, or one persistent kernel)
is chosen in fused_rnn/_paths.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _ops, _paths
from ._backend import double_backward_via, resolve_backend, warn_once
from ._validate import check_sequence_args
from .reference import LN_EPS, lstm_sequence_ref


def _allow_tf32(x: torch.Tensor) -> bool:
    """fp32 tl.dot follows torch's cuBLAS TF32 switch (CPU: the interpreter is exact anyway)."""
    return bool(x.is_cuda and x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer, one direction, over a whole sequence, with a hand-written backward.

    Saves x, the weights, the state sequences hs, cs [T+1, B, H] (hs[1:] is the output), (by
    default) the gate pre-activations [T+1, B, 4H] (see fused_rnn.kernels.lstm for the
    save-or-recompute choice), and h0, c0 themselves (for ``reference``: under create_graph=True
    the backward is the reference path's, differentiable, see _backend.double_backward_via).
    The first eager backward writes the gate gradients over the saved gates (one [T+1, B, 4H]
    buffer less at its peak); a later backward of the same graph (retain_graph=True) first runs
    the forward again for identical gates, so that it returns the same gradients, bit for bit.
    Traced backwards (torch.compile) call the op that leaves the saved gates alone.
    ``path`` (optional, last): "auto", "step", "graph" or "persistent" for the forward and the
    backward (fused_rnn._paths); "auto" defers to use_path() / FUSED_RNN_PATH / the policy.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, eps, allow_tf32, fused,
                save_gates, path="auto"):
        path = _request(path)
        h_n, c_n, hs, cs, gates = torch.ops.fused_rnn.lstm_fwd(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, eps, allow_tf32, fused, save_gates, path
        )
        ctx.save_for_backward(x, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, hs, cs, gates, h0, c0)
        ctx.eps, ctx.allow_tf32, ctx.fused, ctx.path = eps, allow_tf32, fused, path
        # the outputs are the saved h_t themselves (hs holds h0, then each step's output): no
        # buffer of their own; autograd refuses in-place ops on them (lstm_sequence's
        # _own_output hands the user a copy where a graph is recorded).
        return hs[1:], h_n, c_n

    @staticmethod
    def reference(ctx):
        """The forward's tensor inputs, as saved, and the reference path from them to the outputs."""
        x, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, _hs, _cs, _gates, h0, c0 = ctx.saved_tensors

        def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb):
            ln = None if gw is None else (gw, gb, cw, cb)
            return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, ctx.eps)

        return (x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb), forward

    @staticmethod
    @double_backward_via(reference)
    def backward(ctx, dout, dh_n, dc_n):
        x, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, hs, cs, gates, _h0, _c0 = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dw = any(need[3:11])
        args = (dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, gw, gb, cw, cb, lengths,
                ctx.eps, ctx.allow_tf32, ctx.fused, need[0], need_dw, ctx.path)
        if _eager(gates):
            if getattr(ctx, "gates_consumed", False):
                # an earlier backward of this graph (retain_graph=True) wrote dG over them: run
                # the forward again for the same gates, bit for bit (backward stays reentrant;
                # a GEMM recompute would round differently)
                gates = torch.ops.fused_rnn.lstm_fwd(
                    x, hs[0].to(x.dtype), cs[0].to(x.dtype), w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths,
                    ctx.eps, ctx.allow_tf32, ctx.fused, True, ctx.path)[4]
                args = args[:8] + (gates,) + args[9:]
            ctx.gates_consumed = gates.numel() > 0
            res = _ops.lstm_bwd_consuming(*args)
        else:
            res = torch.ops.fused_rnn.lstm_bwd(*args)
        dx, dh0, dc0, dw_ih, dw_hh, db, dgw, dgb, dcw, dcb = res
        return (
            dx if need[0] else None,
            dh0 if need[1] else None,
            dc0 if need[2] else None,
            dw_ih if need[3] else None,
            dw_hh if need[4] else None,
            db.to(b_ih.dtype) if need[5] else None,
            db.to(b_hh.dtype) if need[6] else None,
            dgw if need[7] else None,
            dgb if need[8] else None,
            dcw if need[9] else None,
            dcb if need[10] else None,
            None, None, None, None, None, None,
        )


class LSTMProjFunction(torch.autograd.Function):
    """One layer, one direction of the LSTM with projections (nn.LSTM's proj_size; plain or
    layer-norm), with a hand-written backward: fused_rnn::lstm_proj_fwd / lstm_proj_bwd
    (kernels/lstm_proj.py). Saves x, the weights, hp [T+1, B, P] (hp[1:] is the output), hs, cs
    [T+1, B, H], the gates [T+1, B, 4H], and h0, c0 (for ``reference``, as LSTMFunction's); the backward
    reads them and writes none (so a second backward of the same graph needs nothing special)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb, lengths, eps, allow_tf32, path="auto"):
        path = _request(path)
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
            ln = None if gw is None else (gw, gb, cw, cb)
            return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, ctx.eps, w_hr)

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


def _request(path: str) -> str:
    """The path the caller's thread asks for (use_path is per context), fixed in forward for the
    backward, which the autograd engine may run on another thread. Traced forwards keep "auto":
    the op then reads the request where it runs."""
    return path if torch.compiler.is_compiling() else _paths.requested(path)


def _eager(t: torch.Tensor) -> bool:
    """Whether this backward runs eagerly on real tensors, so that it may write into the saved
    gates (nothing records the write): not under torch.compile / export tracing, no fake or
    functional tensor subclass, no Python dispatch mode (make_fx) active. When in doubt, no."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
        return False
    mode = getattr(torch.utils._python_dispatch, "_get_current_dispatch_mode", None)
    return mode is not None and mode() is None


def _own_output(copy, out, h_n, c_n):
    """The Functions return their saved h sequence as the output (a view, no copy). Where
    autograd records it and ``copy``, a copy instead, so that in-place ops on it work (autograd
    refuses them on a custom Function's view): one [T, B, H] tensor and a copy, as nn.LSTM's
    own output. Without grad the view is returned as is."""
    return (out.clone() if copy and out.requires_grad else out), h_n, c_n


def _same_dtype(x, tensors) -> bool:
    return all(t is None or t.dtype == x.dtype for t in tensors)


def lstm_sequence(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: Optional[torch.Tensor] = None,
    b_hh: Optional[torch.Tensor] = None,
    ln: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    lengths: Optional[torch.Tensor] = None,
    backend: str = "auto",
    w_hr: Optional[torch.Tensor] = None,
    *,
    copy_output: bool = True,
):
    """x [T, B, I], h0/c0 [B, H], w_ih [4H, I], w_hh [4H, H], b_* [4H] or None,
    ln None or (gate_weight [4H], gate_bias [4H], cell_weight [H], cell_bias [H]),
    lengths None or [B] -> (out [T, B, H], h_n [B, H], c_n [B, H]).

    ``w_hr`` [P, H] or None: torch.nn.LSTM's projection (proj_size P); then h0, h_n are [B, P],
    w_hh is [4H, P] and out is [T, B, P] (LSTMProjFunction: cuBLAS products around the
    unfused pointwise kernels, kernels/lstm_proj.py).

    Checked before any backend runs, alike on all (fused_rnn._validate.check_sequence_args):
    every tensor a floating-point torch.Tensor on x's device (TypeError / ValueError naming it);
    ``lengths`` an int32 / int64 tensor on the CPU or x's device, or a list of ints, each in
    [0, T] (values checked only on the CPU: no device sync); ``backend`` one of BACKENDS. Meta
    tensors run the reference path on every backend, shapes only (as nn.LSTM on "meta").

    ``copy_output=False``: on the triton backend, the output is the h sequence saved for
    backward itself (a view, no copy), on which autograd refuses in-place ops; by default it is
    a copy where autograd records it, so that in-place ops work as on nn.LSTM's."""
    lengths = check_sequence_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, w_hr, backend=backend)
    if x.device.type != "meta" and resolve_backend(backend, x) == "triton":
        kernels = _ops.lstm_kernels()
        reason = kernels.unsupported(x, w_hh, ln)
        if reason is None and not _same_dtype(x, (h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh) + tuple(ln or ())):
            reason = "mixed dtypes"
        if reason is None:
            gw, gb, cw, cb = ln if ln is not None else (None,) * 4
            if w_hr is not None:
                return _own_output(copy_output, *LSTMProjFunction.apply(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb,
                                                           lengths, LN_EPS, _allow_tf32(x)))
            # inference (no grad wanted): nothing is saved, so the gates are not stored either
            grad = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh) + tuple(ln or ()))
            return _own_output(copy_output, *LSTMFunction.apply(
                x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, LN_EPS, _allow_tf32(x),
                kernels.default_fused(w_hh.shape[1], ln, x.dtype), kernels.SAVE_GATES and grad,
            ))
        warn_once(f"lstm:{reason}", f"fused_rnn: the LSTM kernels cannot take {reason}; using the reference path")
    return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, LN_EPS, w_hr)
