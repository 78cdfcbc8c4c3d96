"""The LSTM and layer-norm LSTM over a whole sequence (one layer, one direction): the custom ops
fused_rnn::lstm_fwd / lstm_bwd, their autograd Function and ``lstm_sequence``, the entry point
the layers call.

The ops run the launchers of fused_rnn.kernels.lstm (input projection GEMM, a time loop of fused
step kernels, and in backward a reverse loop followed by the weight and input GEMMs) on the path
fused_rnn._paths resolves: eager step launches, a replayed CUDA graph of them, or one persistent
kernel. torch.compile(fullgraph=True) sees one opaque op per sequence and direction; the fake
implementations give the output shapes and dtypes (kernels.config). Optional outputs are empty
tensors (custom ops cannot return None).

(No ``from __future__ import annotations``: custom_op reads the real type hints.)
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _paths, aten, cpu_lstm
from ._backend import allow_tf32, aten_route, double_backward_via, resolve_backend, warn_once
from ._validate import check_sequence_args, same_dtype
from .kernels import config
from .lstm_proj import LSTMProjFunction
from .reference import lstm_sequence_ref


def _kernels():
    """fused_rnn.kernels.lstm, imported at the first launch: it imports Triton, which the
    reference path (and a machine without Triton) must not need."""
    from .kernels import lstm

    return lstm


def _ln(gw, gb, cw, cb):
    return None if gw is None else (gw, gb, cw, cb)


@torch.library.custom_op("fused_rnn::lstm_fwd", mutates_args=())
def _lstm_fwd_op(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_gw: Optional[Tensor], ln_gb: Optional[Tensor], ln_cw: Optional[Tensor], ln_cb: Optional[Tensor],
    lengths: Optional[Tensor], eps: float, allow_tf32: bool, fused: bool, save_gates: bool,
    path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> h_n, c_n [B,H] (x's dtype); hs, cs [T+1,B,H], gates [T+1,B,4H] (slot T zero) or [0] (in
    the dtypes of kernels.config). The output sequence is hs[1:] (x's dtype; 0 past a sequence's
    end): a view the caller takes, since an op's outputs may not alias each other."""
    K = _kernels()
    ln = _ln(ln_gw, ln_gb, ln_cw, ln_cb)

    def run(*a, plan=None):  # the launcher without its out (= hs[1:])
        return K.lstm_fwd(*a, eps=eps, allow_tf32=allow_tf32, fused=fused, save_gates=save_gates, plan=plan)[1:]

    return _paths.launch(
        "lstm_fwd", path, x,
        lambda: K.persistent_plan("fwd", x.shape[1], w_hh.shape[1], ln, fused, x.dtype, x.device,
                                  allow_tf32=allow_tf32),
        run, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths), (eps, allow_tf32, fused, save_gates),
        "lstm" if ln is None else "lnlstm", w_hh.shape[1])


@_lstm_fwd_op.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths, eps, allow_tf32, fused, save_gates,
      path="auto"):
    T, B, _I = x.shape
    G, H = w_hh.shape
    ln = ln_gw is not None
    if save_gates:  # slot T: spare, zero (kernels.lstm.lstm_fwd)
        gates = x.new_empty((T + 1, B, G), dtype=config.lstm_gates_dtype(x.dtype, ln))
    else:
        gates = x.new_empty((0,), dtype=config.state_dtype(x.dtype))
    return (
        x.new_empty((B, H)), x.new_empty((B, H)),
        x.new_empty((T + 1, B, H), dtype=config.lstm_hs_dtype(x.dtype)),
        x.new_empty((T + 1, B, H), dtype=config.lstm_cs_dtype(x.dtype, ln)),
        gates,
    )


@torch.library.custom_op("fused_rnn::lstm_bwd", mutates_args=())
def _lstm_bwd_op(
    dout: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor,
    hs: Tensor, cs: Tensor, gates: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_gw: Optional[Tensor], ln_gb: Optional[Tensor], ln_cw: Optional[Tensor], ln_cb: Optional[Tensor],
    lengths: Optional[Tensor], eps: float, allow_tf32: bool, fused: bool, need_dx: bool, need_dw: bool,
    path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx [T,B,I] (or [0]), dh0, dc0 [B,H], dw_ih [4H,I], dw_hh [4H,H], db [4H] (state dtype),
    dln_gw [4H], dln_gb [4H], dln_cw [H], dln_cb [H]; the weight ones [0] when not need_dw, the
    LN ones [0] without LN. ``gates`` is read, never written (see lstm_bwd_consuming)."""
    return _lstm_bwd(dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb,
                     lengths, eps, allow_tf32, fused, need_dx, need_dw, path, consume_gates=False)


def lstm_bwd_consuming(*args):
    """fused_rnn::lstm_bwd's computation (same arguments, same results) that writes the gate
    gradients over ``gates`` (kernels.lstm.lstm_bwd(consume_gates=True)) instead of allocating
    them: a [T+1, B, 4H] buffer less at the backward's peak. Not an op: for eager callers that
    own ``gates`` and will not read it again (LSTMFunction's first backward); traced code calls
    the op, which leaves its inputs alone."""
    return _lstm_bwd(*args, consume_gates=True)


def _lstm_bwd(dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb,
              lengths, eps, allow_tf32, fused, need_dx, need_dw, path="auto", *, consume_gates):
    K = _kernels()
    ln = _ln(ln_gw, ln_gb, ln_cw, ln_cb)

    def run(*a, plan=None):  # on the graph path, the graph consumes its own static copy of gates
        return K.lstm_bwd(*a, eps=eps, allow_tf32=allow_tf32, fused=fused, need_dx=need_dx, need_dw=need_dw,
                          consume_gates=consume_gates, plan=plan)

    dx, dh0, dc0, dw_ih, dw_hh, db, dln = _paths.launch(
        "lstm_bwd", path, x,
        lambda: K.persistent_plan("bwd", x.shape[1], w_hh.shape[1], ln, fused, x.dtype, x.device,
                                  allow_tf32=allow_tf32),
        run, (dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, ln, lengths),
        (eps, allow_tf32, fused, need_dx, need_dw, consume_gates), "lstm" if ln is None else "lnlstm", w_hh.shape[1])
    sd = x.new_empty(0, dtype=config.state_dtype(x.dtype))
    return _paths.or_empty((dx, dh0, dc0, dw_ih, dw_hh, db, *(dln or (None,) * 4)),
                           (x, x, x, w_ih, w_hh, sd, x, x, x, x))


@_lstm_bwd_op.register_fake
def _(dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths,
      eps, allow_tf32, fused, need_dx, need_dw, path="auto"):
    dx, dw, db, dln = _paths.fake_grads(x, need_dx, need_dw, (w_ih, w_hh), (ln_gw, ln_gb, ln_cw, ln_cb))
    B, H = x.shape[1], w_hh.shape[1]
    return (dx, x.new_empty((B, H)), x.new_empty((B, H)), *dw, db, *dln)


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer, one direction, over a whole sequence, with a hand-written backward.

    Saves x, the weights, the state sequences hs, cs [T+1, B, H] (hs[1:] is the output), (by
    default, options().save_gates) the gate pre-activations [T+1, B, 4H], and h0, c0 themselves
    (for ``reference``: under create_graph=True the backward is the reference path's,
    differentiable, see _backend.double_backward_via). The first eager backward writes the gate
    gradients over the saved gates (one [T+1, B, 4H] buffer less at its peak); a later backward
    of the same graph (retain_graph=True) first runs the forward again for identical gates, so
    that it returns the same gradients, bit for bit. Traced backwards (torch.compile) call the op
    that leaves the saved gates alone. ``path`` (optional, last): "auto", "step", "graph" or
    "persistent" for the forward and the backward (fused_rnn._paths).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, eps, allow_tf32, fused,
                save_gates, path="auto"):
        path = _paths.forward_request(path)
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
            return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ln(gw, gb, cw, cb), lengths, ctx.eps)

        return (x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb), forward

    @staticmethod
    @double_backward_via(reference)
    def backward(ctx, dout, dh_n, dc_n):
        x, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, hs, cs, gates, _h0, _c0 = ctx.saved_tensors
        need = ctx.needs_input_grad
        args = (dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, gw, gb, cw, cb, lengths,
                ctx.eps, ctx.allow_tf32, ctx.fused, need[0], any(need[3:11]), ctx.path)
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
            res = lstm_bwd_consuming(*args)
        else:
            res = torch.ops.fused_rnn.lstm_bwd(*args)
        dx, dh0, dc0, dw_ih, dw_hh, db, dgw, dgb, dcw, dcb = res
        grads = (dx, dh0, dc0, dw_ih, dw_hh, db.to(x.dtype if b_ih is None else b_ih.dtype),
                 db.to(x.dtype if b_hh is None else b_hh.dtype), dgw, dgb, dcw, dcb)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 6


def _eager(t: Tensor) -> bool:
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


def _cpu_route(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, w_hr, copy_output):
    """auto on a CPU tensor: torch's ATen op for what torch.nn computes (fused_rnn.aten), the
    whole-sequence Function of fused_rnn.cpu_lstm for the layer-norm LSTM without projection;
    None where neither takes the arguments (the reference loop runs)."""
    if ln is None:
        return aten.single_layer("LSTM", x, (h0, c0), [w_ih, w_hh, b_ih, b_hh, w_hr], lengths)
    if w_hr is None:
        done = cpu_lstm.lstm_sequence_cpu(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, config.LN_EPS)
        return None if done is None else _own_output(copy_output, *done)
    return None


def lstm_sequence(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
                  b_hh: Optional[Tensor] = None, ln: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
                  lengths: Optional[Tensor] = None, backend: str = "auto", w_hr: Optional[Tensor] = None, *,
                  copy_output: bool = True):
    """x [T, B, I], h0/c0 [B, H], w_ih [4H, I], w_hh [4H, H], b_* [4H] or None,
    ln None or (gate_weight [4H], gate_bias [4H], cell_weight [H], cell_bias [H]),
    lengths None or [B] -> (out [T, B, H], h_n [B, H], c_n [B, H]).

    ``w_hr`` [P, H] or None: torch.nn.LSTM's projection (proj_size P); then h0, h_n are [B, P],
    w_hh is [4H, P] and out is [T, B, P] (LSTMProjFunction, fused_rnn/lstm_proj.py).

    Checked before any backend runs, alike on all (fused_rnn._validate.check_sequence_args):
    every tensor a floating-point torch.Tensor on x's device (TypeError / ValueError naming it);
    ``lengths`` an int32 / int64 tensor on the CPU or x's device, or a list of ints, each in
    [0, T] (values checked only on the CPU: no device sync); ``backend`` one of BACKENDS. Meta
    tensors run the reference path on every backend, shapes only (as nn.LSTM on "meta"). "auto"
    on CPU tensors: torch's ATen op (fused_rnn.aten.single_layer) without layer norm, the
    whole-sequence route (fused_rnn.cpu_lstm) with it, else the reference path.

    ``copy_output=False``: on the triton backend, the output is the h sequence saved for
    backward itself (a view, no copy), on which autograd refuses in-place ops; by default it is
    a copy where autograd records it, so that in-place ops work as on nn.LSTM's."""
    lengths = check_sequence_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, w_hr, backend=backend)
    if aten_route(backend, x):
        done = _cpu_route(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, w_hr, copy_output)
        if done is not None:
            return done
    if x.device.type != "meta" and resolve_backend(backend, x) == "triton":
        reason = _kernels().unsupported(x, w_hh, ln)
        if reason is None and not same_dtype(x, (h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh) + tuple(ln or ())):
            reason = "mixed dtypes"
        if reason is None:
            gw, gb, cw, cb = ln if ln is not None else (None,) * 4
            if w_hr is not None:
                return _own_output(copy_output, *LSTMProjFunction.apply(
                    x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, gw, gb, cw, cb, lengths, config.LN_EPS, allow_tf32(x)))
            # inference (no grad wanted): nothing is saved, so the gates are not stored either
            grad = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh) + tuple(ln or ()))
            return _own_output(copy_output, *LSTMFunction.apply(
                x, h0, c0, w_ih, w_hh, b_ih, b_hh, gw, gb, cw, cb, lengths, config.LN_EPS, allow_tf32(x),
                config.default_fused(w_hh.shape[1], ln, x.dtype), config.options().save_gates and grad,
            ))
        warn_once(f"lstm:{reason}", f"fused_rnn: the LSTM kernels cannot take {reason}; using the reference path")
    return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, config.LN_EPS, w_hr)
