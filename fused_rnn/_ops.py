"""The whole-sequence Triton launchers registered as torch.library custom ops.

fused_rnn::lstm_fwd / lstm_bwd / lstm_proj_fwd / lstm_proj_bwd / rnn_fwd / rnn_bwd wrap the
launchers of fused_rnn.kernels, so
torch.compile(fullgraph=True) sees one opaque op per sequence and direction instead of tracing
into Triton launches; the autograd Functions in fused_rnn/lstm.py and fused_rnn/rnn.py call them.
The fake (meta) implementations give the output shapes and dtypes.

Optional outputs are returned as empty tensors (custom ops cannot return None). Importing this
module registers the ops but does not import Triton: the kernels are imported on first call.

Each op takes ``path`` ("auto", "step", "graph", "persistent"; default "auto"): which
implementation runs the time loop, chosen at run time by fused_rnn._paths.resolve (the one place
that chooses; see there for the policy and the overrides). Every path returns the same tensors.

(No ``from __future__ import annotations`` here: custom_op reads the real type hints.)
"""
import contextlib
import functools
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _buffers, _paths


def lstm_kernels():
    """fused_rnn.kernels.lstm (imports Triton)."""
    from .kernels import lstm

    return lstm


def rnn_kernels():
    """fused_rnn.kernels.rnn (imports Triton)."""
    from .kernels import rnn

    return rnn


# The Triton interpreter is not thread-safe (a launch patches triton.language for its duration):
# ops on CPU tensors, which run through it, take turns. CUDA launches need no lock.
_INTERPRETER_LOCK = threading.RLock()


@contextlib.contextmanager
def _launching(x: Tensor):
    """The scope of one op's launches: autocast off (the launchers choose every dtype), and on
    CPU tensors the interpreter's lock."""
    lock = contextlib.nullcontext() if x.is_cuda else _INTERPRETER_LOCK
    with lock, torch.autocast(x.device.type, enabled=False):
        yield


def _none(ref: Tensor) -> Tensor:
    """The stand-in for an absent output."""
    return ref.new_empty(0)


def _ln(gw, gb, cw, cb):
    return None if gw is None else (gw, gb, cw, cb)


# ------------------------------------------------------------------------------------------ LSTM


@torch.library.custom_op("fused_rnn::lstm_fwd", mutates_args=())
def lstm_fwd(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_gw: Optional[Tensor], ln_gb: Optional[Tensor], ln_cw: Optional[Tensor], ln_cb: Optional[Tensor],
    lengths: Optional[Tensor], eps: float, allow_tf32: bool, fused: bool, save_gates: bool,
    path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> h_n, c_n [B,H] (x's dtype); hs, cs [T+1,B,H], gates [T+1,B,4H] (slot T zero) or [0] (in
    the dtypes of fused_rnn._buffers). The output sequence is hs[1:] (x's dtype; 0 past a
    sequence's end): a view the caller takes, since an op's outputs may not alias each other."""
    K = lstm_kernels()
    ln = _ln(ln_gw, ln_gb, ln_cw, ln_cb)
    B, H = x.shape[1], w_hh.shape[1]
    p = _paths.resolve("lstm_fwd", path, x, lambda: K.persistent_plan(
        "fwd", B, H, ln, fused, x.dtype, x.device, allow_tf32=allow_tf32))

    def run(*a, path="step"):  # the launcher without its out (= hs[1:])
        return K.lstm_fwd(*a, eps=eps, allow_tf32=allow_tf32, fused=fused, save_gates=save_gates, path=path)[1:]

    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths)
    with _launching(x):
        if p == "graph":
            return _paths.graphed("lstm_fwd", run, args, (eps, allow_tf32, fused, save_gates))
        return run(*args, path=p)


@lstm_fwd.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths, eps, allow_tf32, fused, save_gates,
      path="auto"):
    T, B, _I = x.shape
    G, H = w_hh.shape
    sd = _buffers.state_dtype(x.dtype)
    if save_gates:  # slot T: spare, zero (kernels.lstm.lstm_fwd)
        gates = x.new_empty((T + 1, B, G), dtype=_buffers.lstm_gates_dtype(x.dtype, ln_gw is not None))
    else:
        gates = x.new_empty((0,), dtype=sd)
    return (
        x.new_empty((B, H)), x.new_empty((B, H)),
        x.new_empty((T + 1, B, H), dtype=_buffers.lstm_hs_dtype(x.dtype)),
        x.new_empty((T + 1, B, H), dtype=_buffers.lstm_cs_dtype(x.dtype, ln_gw is not None)),
        gates,
    )


@torch.library.custom_op("fused_rnn::lstm_bwd", mutates_args=())
def lstm_bwd(
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
    own ``gates`` and will not read it again (LSTMFunction's first backward, fused_rnn/lstm.py);
    traced code calls the op, which leaves its inputs alone."""
    return _lstm_bwd(*args, consume_gates=True)


def _lstm_bwd(dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb,
              lengths, eps, allow_tf32, fused, need_dx, need_dw, path="auto", *, consume_gates):
    K = lstm_kernels()
    ln = _ln(ln_gw, ln_gb, ln_cw, ln_cb)
    B, H = x.shape[1], w_hh.shape[1]
    p = _paths.resolve("lstm_bwd", path, x, lambda: K.persistent_plan(
        "bwd", B, H, ln, fused, x.dtype, x.device, allow_tf32=allow_tf32))
    run = functools.partial(K.lstm_bwd, eps=eps, allow_tf32=allow_tf32, fused=fused, need_dx=need_dx,
                            need_dw=need_dw, consume_gates=consume_gates)
    args = (dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, ln, lengths)
    with _launching(x):
        if p == "graph":
            # the graph consumes its own static copy of gates, never the caller's
            res = _paths.graphed("lstm_bwd", run, args, (eps, allow_tf32, fused, need_dx, need_dw, consume_gates))
        else:
            res = run(*args, path=p)
    dx, dh0, dc0, dw_ih, dw_hh, db, dln = res
    dln = tuple(_none(x) for _ in range(4)) if dln is None else dln
    return (
        dx if dx is not None else _none(x), dh0, dc0,
        dw_ih if dw_ih is not None else _none(w_ih), dw_hh if dw_hh is not None else _none(w_hh),
        db if db is not None else x.new_empty(0, dtype=_buffers.state_dtype(x.dtype)), *dln,
    )


@lstm_bwd.register_fake
def _(dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths,
      eps, allow_tf32, fused, need_dx, need_dw, path="auto"):
    T, B, I = x.shape
    G, H = w_hh.shape
    dx = x.new_empty((T, B, I)) if need_dx else _none(x)
    if need_dw:
        dw = (w_ih.new_empty((G, I)), w_hh.new_empty((G, H)), x.new_empty((G,), dtype=_buffers.state_dtype(x.dtype)))
    else:
        dw = (_none(w_ih), _none(w_hh), x.new_empty(0, dtype=_buffers.state_dtype(x.dtype)))
    if need_dw and ln_gw is not None:
        dln = (ln_gw.new_empty((G,)), ln_gb.new_empty((G,)), ln_cw.new_empty((H,)), ln_cb.new_empty((H,)))
    else:
        dln = tuple(_none(x) for _ in range(4))
    return (dx, x.new_empty((B, H)), x.new_empty((B, H)), *dw, *dln)


# ------------------------------------------------------------------- LSTM with projections


def lstm_proj_kernels():
    """fused_rnn.kernels.lstm_proj (imports Triton)."""
    from .kernels import lstm_proj

    return lstm_proj


def _no_persistent_plan():
    return None, "no persistent kernel takes proj_size"


@torch.library.custom_op("fused_rnn::lstm_proj_fwd", mutates_args=())
def lstm_proj_fwd(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_gw: Optional[Tensor], ln_gb: Optional[Tensor], ln_cw: Optional[Tensor], ln_cb: Optional[Tensor],
    lengths: Optional[Tensor], eps: float, allow_tf32: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> h_n [B,P], c_n [B,H] (x's dtype); hp [T+1,B,P], hs [T+1,B,H], cs [T+1,B,H], gates
    [T+1,B,4H] (kernels/lstm_proj.py). The output sequence is the view hp[1:]. Paths: step, or
    graph (no persistent kernel)."""
    K = lstm_proj_kernels()
    p = _paths.resolve("lstm_proj_fwd", path, x, _no_persistent_plan)

    def run(*a):  # the launcher without its out (= hp[1:])
        return K.lstm_proj_fwd(*a, eps=eps, allow_tf32=allow_tf32)[1:]

    args = (x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, _ln(ln_gw, ln_gb, ln_cw, ln_cb), lengths)
    with _launching(x):
        if p == "graph":
            return _paths.graphed("lstm_proj_fwd", run, args, (eps, allow_tf32))
        return run(*args)


@lstm_proj_fwd.register_fake
def _(x, h0, c0, w_ih, w_hh, w_hr, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths, eps, allow_tf32, path="auto"):
    T, B, _I = x.shape
    G, P = w_hh.shape
    H = G // 4
    ln = ln_gw is not None
    return (
        x.new_empty((B, P)), x.new_empty((B, H)),
        x.new_empty((T + 1, B, P), dtype=_buffers.lstm_hs_dtype(x.dtype)),
        x.new_empty((T + 1, B, H), dtype=_buffers.lstm_hs_dtype(x.dtype)),
        x.new_empty((T + 1, B, H), dtype=_buffers.lstm_cs_dtype(x.dtype, ln)),
        x.new_empty((T + 1, B, G), dtype=_buffers.lstm_gates_dtype(x.dtype, ln)),
    )


@torch.library.custom_op("fused_rnn::lstm_proj_bwd", mutates_args=())
def lstm_proj_bwd(
    dout: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Tensor,
    hp: Tensor, hs: Tensor, cs: Tensor, gates: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_gw: Optional[Tensor], ln_gb: Optional[Tensor], ln_cw: Optional[Tensor], ln_cb: Optional[Tensor],
    lengths: Optional[Tensor], eps: float, allow_tf32: bool, need_dx: bool, need_dw: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx [T,B,I] (or [0]), dh0 [B,P], dc0 [B,H], dw_ih [4H,I], dw_hh [4H,P], dw_hr [P,H],
    db [4H] (state dtype), dln_gw [4H], dln_gb [4H], dln_cw [H], dln_cb [H]; the weight ones [0]
    when not need_dw, the LN ones [0] without LN. Reads its inputs, writes none of them."""
    K = lstm_proj_kernels()
    p = _paths.resolve("lstm_proj_bwd", path, x, _no_persistent_plan)
    run = functools.partial(K.lstm_proj_bwd, eps=eps, allow_tf32=allow_tf32, need_dx=need_dx, need_dw=need_dw)
    args = (dout, dh_n, dc_n, x, w_ih, w_hh, w_hr, hp, hs, cs, gates, b_ih, b_hh,
            _ln(ln_gw, ln_gb, ln_cw, ln_cb), lengths)
    with _launching(x):
        if p == "graph":
            res = _paths.graphed("lstm_proj_bwd", run, args, (eps, allow_tf32, need_dx, need_dw))
        else:
            res = run(*args)
    dx, dh0, dc0, dw_ih, dw_hh, dw_hr, db, dln = res
    dln = tuple(_none(x) for _ in range(4)) if dln is None else dln
    return (
        dx if dx is not None else _none(x), dh0, dc0,
        dw_ih if dw_ih is not None else _none(w_ih), dw_hh if dw_hh is not None else _none(w_hh),
        dw_hr if dw_hr is not None else _none(w_hr),
        db if db is not None else x.new_empty(0, dtype=_buffers.state_dtype(x.dtype)), *dln,
    )


@lstm_proj_bwd.register_fake
def _(dout, dh_n, dc_n, x, w_ih, w_hh, w_hr, hp, hs, cs, gates, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths,
      eps, allow_tf32, need_dx, need_dw, path="auto"):
    T, B, I = x.shape
    G, P = w_hh.shape
    H = G // 4
    sd = _buffers.state_dtype(x.dtype)
    dx = x.new_empty((T, B, I)) if need_dx else _none(x)
    if need_dw:
        dw = (w_ih.new_empty((G, I)), w_hh.new_empty((G, P)), w_hr.new_empty((P, H)), x.new_empty((G,), dtype=sd))
    else:
        dw = (_none(w_ih), _none(w_hh), _none(w_hr), x.new_empty(0, dtype=sd))
    if need_dw and ln_gw is not None:
        dln = (ln_gw.new_empty((G,)), ln_gb.new_empty((G,)), ln_cw.new_empty((H,)), ln_cb.new_empty((H,)))
    else:
        dln = tuple(_none(x) for _ in range(4))
    return (dx, x.new_empty((B, P)), x.new_empty((B, H)), *dw, *dln)


# ------------------------------------------------------------------------------------------- RNN


@torch.library.custom_op("fused_rnn::rnn_fwd", mutates_args=())
def rnn_fwd(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    lengths: Optional[Tensor], nonlinearity: str, allow_tf32: bool, fused: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> out [T,B,H], h_n [B,H] (x's dtype); hs [T+1,B,H] (state dtype)."""
    K = rnn_kernels()
    B, H = x.shape[1], w_hh.shape[1]
    p = _paths.resolve("rnn_fwd", path, x, lambda: K.persistent_plan(
        "fwd", B, H, fused, x.dtype, x.device, allow_tf32=allow_tf32))
    run = functools.partial(K.rnn_fwd, nonlinearity=nonlinearity, allow_tf32=allow_tf32, fused=fused)
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
    with _launching(x):
        if p == "graph":
            return _paths.graphed("rnn_fwd", run, args, (nonlinearity, allow_tf32, fused))
        return run(*args, path=p)


@rnn_fwd.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, allow_tf32, fused, path="auto"):
    T, B, _I = x.shape
    H = w_hh.shape[1]
    sd = _buffers.state_dtype(x.dtype)
    return x.new_empty((T, B, H)), x.new_empty((B, H)), x.new_empty((T + 1, B, H), dtype=sd)


@torch.library.custom_op("fused_rnn::rnn_bwd", mutates_args=())
def rnn_bwd(
    dout: Tensor, dh_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, hs: Tensor, lengths: Optional[Tensor],
    nonlinearity: str, allow_tf32: bool, fused: bool, need_dx: bool, need_dw: bool, path: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx [T,B,I] (or [0]), dh0 [B,H], dw_ih [H,I], dw_hh [H,H], db [H] (state dtype); the
    weight ones [0] when not need_dw."""
    K = rnn_kernels()
    B, H = x.shape[1], w_hh.shape[1]
    p = _paths.resolve("rnn_bwd", path, x, lambda: K.persistent_plan(
        "bwd", B, H, fused, x.dtype, x.device, allow_tf32=allow_tf32))
    run = functools.partial(K.rnn_bwd, nonlinearity=nonlinearity, allow_tf32=allow_tf32, fused=fused,
                            need_dx=need_dx, need_dw=need_dw)
    args = (dout, dh_n, x, w_ih, w_hh, hs, lengths)
    with _launching(x):
        if p == "graph":
            res = _paths.graphed("rnn_bwd", run, args, (nonlinearity, allow_tf32, fused, need_dx, need_dw))
        else:
            res = run(*args, path=p)
    dx, dh0, dw_ih, dw_hh, db = res
    return (
        dx if dx is not None else _none(x), dh0,
        dw_ih if dw_ih is not None else _none(w_ih), dw_hh if dw_hh is not None else _none(w_hh),
        db if db is not None else _none(hs),
    )


@rnn_bwd.register_fake
def _(dout, dh_n, x, w_ih, w_hh, hs, lengths, nonlinearity, allow_tf32, fused, need_dx, need_dw, path="auto"):
    T, B, I = x.shape
    H = w_hh.shape[1]
    dx = x.new_empty((T, B, I)) if need_dx else _none(x)
    if need_dw:
        dw = (w_ih.new_empty((H, I)), w_hh.new_empty((H, H)), hs.new_empty((H,)))
    else:
        dw = (_none(w_ih), _none(w_hh), _none(hs))
    return (dx, x.new_empty((B, H)), *dw)
