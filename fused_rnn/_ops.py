"""The whole-sequence Triton launchers registered as torch.library custom ops.

fused_rnn::lstm_fwd / lstm_bwd / rnn_fwd / rnn_bwd wrap the launchers of fused_rnn.kernels, so
torch.compile(fullgraph=True) sees one opaque op per sequence and direction instead of tracing
into Triton launches; the autograd Functions in fused_rnn/lstm.py and fused_rnn/rnn.py call them.
The fake (meta) implementations give the output shapes and dtypes.

Optional outputs are returned as empty tensors (custom ops cannot return None). Importing this
module registers the ops but does not import Triton: the kernels are imported on first call.

(No ``from __future__ import annotations`` here: custom_op reads the real type hints.)
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def lstm_kernels():
    """fused_rnn.kernels.lstm (imports Triton)."""
    from .kernels import lstm

    return lstm


def rnn_kernels():
    """fused_rnn.kernels.rnn (imports Triton)."""
    from .kernels import rnn

    return rnn


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> out [T,B,H], h_n, c_n [B,H] (x's dtype); hs, cs [T+1,B,H], gates [T,B,4H] or [0]
    (state dtype)."""
    with torch.autocast(x.device.type, enabled=False):
        return lstm_kernels().lstm_fwd(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ln(ln_gw, ln_gb, ln_cw, ln_cb), lengths,
            eps=eps, allow_tf32=allow_tf32, fused=fused, save_gates=save_gates,
        )


@lstm_fwd.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths, eps, allow_tf32, fused, save_gates):
    T, B, _I = x.shape
    G, H = w_hh.shape
    sd = _state_dtype(x.dtype)
    gates = x.new_empty((T, B, G), dtype=sd) if save_gates else x.new_empty((0,), dtype=sd)
    return (
        x.new_empty((T, B, H)), x.new_empty((B, H)), x.new_empty((B, H)),
        x.new_empty((T + 1, B, H), dtype=sd), x.new_empty((T + 1, B, H), dtype=sd), gates,
    )


@torch.library.custom_op("fused_rnn::lstm_bwd", mutates_args=())
def lstm_bwd(
    dout: Tensor, dh_n: Tensor, dc_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor,
    hs: Tensor, cs: Tensor, gates: Tensor,
    b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_gw: Optional[Tensor], ln_gb: Optional[Tensor], ln_cw: Optional[Tensor], ln_cb: Optional[Tensor],
    lengths: Optional[Tensor], eps: float, allow_tf32: bool, fused: bool, need_dx: bool, need_dw: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx [T,B,I] (or [0]), dh0, dc0 [B,H], dw_ih [4H,I], dw_hh [4H,H], db [4H] (state dtype),
    dln_gw [4H], dln_gb [4H], dln_cw [H], dln_cb [H]; the weight ones [0] when not need_dw, the
    LN ones [0] without LN."""
    ln = _ln(ln_gw, ln_gb, ln_cw, ln_cb)
    with torch.autocast(x.device.type, enabled=False):
        dx, dh0, dc0, dw_ih, dw_hh, db, dln = lstm_kernels().lstm_bwd(
            dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, ln, lengths,
            eps=eps, allow_tf32=allow_tf32, fused=fused, need_dx=need_dx, need_dw=need_dw,
        )
    dln = tuple(_none(x) for _ in range(4)) if dln is None else dln
    return (
        dx if dx is not None else _none(x), dh0, dc0,
        dw_ih if dw_ih is not None else _none(w_ih), dw_hh if dw_hh is not None else _none(w_hh),
        db if db is not None else _none(hs), *dln,
    )


@lstm_bwd.register_fake
def _(dout, dh_n, dc_n, x, w_ih, w_hh, hs, cs, gates, b_ih, b_hh, ln_gw, ln_gb, ln_cw, ln_cb, lengths,
      eps, allow_tf32, fused, need_dx, need_dw):
    T, B, I = x.shape
    G, H = w_hh.shape
    dx = x.new_empty((T, B, I)) if need_dx else _none(x)
    if need_dw:
        dw = (w_ih.new_empty((G, I)), w_hh.new_empty((G, H)), hs.new_empty((G,)))
    else:
        dw = (_none(w_ih), _none(w_hh), _none(hs))
    if need_dw and ln_gw is not None:
        dln = (ln_gw.new_empty((G,)), ln_gb.new_empty((G,)), ln_cw.new_empty((H,)), ln_cb.new_empty((H,)))
    else:
        dln = tuple(_none(x) for _ in range(4))
    return (dx, x.new_empty((B, H)), x.new_empty((B, H)), *dw, *dln)


# ------------------------------------------------------------------------------------------- RNN


@torch.library.custom_op("fused_rnn::rnn_fwd", mutates_args=())
def rnn_fwd(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    lengths: Optional[Tensor], nonlinearity: str, allow_tf32: bool, fused: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """-> out [T,B,H], h_n [B,H] (x's dtype); hs [T+1,B,H] (state dtype)."""
    with torch.autocast(x.device.type, enabled=False):
        return rnn_kernels().rnn_fwd(
            x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity=nonlinearity, allow_tf32=allow_tf32, fused=fused
        )


@rnn_fwd.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity, allow_tf32, fused):
    T, B, _I = x.shape
    H = w_hh.shape[1]
    sd = _state_dtype(x.dtype)
    return x.new_empty((T, B, H)), x.new_empty((B, H)), x.new_empty((T + 1, B, H), dtype=sd)


@torch.library.custom_op("fused_rnn::rnn_bwd", mutates_args=())
def rnn_bwd(
    dout: Tensor, dh_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, hs: Tensor, lengths: Optional[Tensor],
    nonlinearity: str, allow_tf32: bool, fused: bool, need_dx: bool, need_dw: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dx [T,B,I] (or [0]), dh0 [B,H], dw_ih [H,I], dw_hh [H,H], db [H] (state dtype); the
    weight ones [0] when not need_dw."""
    with torch.autocast(x.device.type, enabled=False):
        dx, dh0, dw_ih, dw_hh, db = rnn_kernels().rnn_bwd(
            dout, dh_n, x, w_ih, w_hh, hs, lengths, nonlinearity=nonlinearity, allow_tf32=allow_tf32,
            fused=fused, need_dx=need_dx, need_dw=need_dw,
        )
    return (
        dx if dx is not None else _none(x), dh0,
        dw_ih if dw_ih is not None else _none(w_ih), dw_hh if dw_hh is not None else _none(w_hh),
        db if db is not None else _none(hs),
    )


@rnn_bwd.register_fake
def _(dout, dh_n, x, w_ih, w_hh, hs, lengths, nonlinearity, allow_tf32, fused, need_dx, need_dw):
    T, B, I = x.shape
    H = w_hh.shape[1]
    dx = x.new_empty((T, B, I)) if need_dx else _none(x)
    if need_dw:
        dw = (w_ih.new_empty((H, I)), w_hh.new_empty((H, H)), hs.new_empty((H,)))
    else:
        dw = (_none(w_ih), _none(w_hh), _none(hs))
    return (dx, x.new_empty((B, H)), *dw)
