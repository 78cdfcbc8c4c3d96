"""Argument checks shared by the layers and the functional entry points: clear errors that name
the argument and what is allowed, as torch.nn does, raised before any backend is chosen (so the
same on every backend), and never a silent broadcast."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from ._backend import BACKENDS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LENGTH_DTYPES = (torch.int32, torch.int64)
NONLINEARITIES = ("tanh", "relu")
LN_PARTS = ("gate_weight", "gate_bias", "cell_weight", "cell_bias")


def check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_nonlinearity(nonlinearity: str) -> str:
    if not isinstance(nonlinearity, str) or nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return nonlinearity


def check_float(t: torch.Tensor, name: str, optional: bool = False) -> None:
    """``t`` is a floating-point tensor (or None, when ``optional``): else a TypeError naming it."""
    if optional and t is None:
        return
    if not isinstance(t, torch.Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {what}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )


def check_input(x: torch.Tensor, input_size: int, batch_first: bool, name: str = "input") -> bool:
    """Checks a sequence input; returns True for a batched (3-D) input, False for unbatched (2-D)."""
    check_float(x, name)
    layout = "(N, L, H_in)" if batch_first else "(L, N, H_in)"
    if x.dim() not in (2, 3):
        raise ValueError(
            f"{name} must be 2-D (L, H_in) unbatched or 3-D {layout} batched, "
            f"got {x.dim()}-D with shape {tuple(x.shape)}"
        )
    if x.shape[-1] != input_size:
        raise ValueError(
            f"{name} has {x.shape[-1]} features in its last dimension, expected input_size="
            f"{input_size} (shape {tuple(x.shape)})"
        )
    batched = x.dim() == 3
    T = x.shape[1] if batched and batch_first else x.shape[0]
    # an empty batch (B == 0) runs, as in torch.nn: empty outputs, zero weight gradients
    if T == 0:
        raise ValueError(f"{name} is a zero-length sequence (0 time steps), shape {tuple(x.shape)}")
    return batched


def check_cell_input(x: torch.Tensor, input_size: int, name: str = "input") -> bool:
    """Checks a cell input (B, H_in) or unbatched (H_in,); returns True when batched."""
    check_float(x, name)
    if x.dim() not in (1, 2):
        raise ValueError(
            f"{name} must be 1-D (H_in,) or 2-D (N, H_in), got {x.dim()}-D with shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[-1] != input_size:
        raise ValueError(
            f"{name} has {x.shape[-1]} features in its last dimension, expected input_size="
            f"{input_size} (shape {tuple(x.shape)})"
        )
    return x.dim() == 2


def check_state(
    t: torch.Tensor, expected: Sequence[int], name: str, like: torch.Tensor, dtype: bool = True
) -> None:
    """A state tensor must have exactly the expected shape, and the device (and, unless
    ``dtype`` is False, as under autocast, the dtype) of ``like``."""
    check_float(t, name)
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
    check_same(t, like, name, "input", dtype)


def check_same(
    t: torch.Tensor, like: torch.Tensor, name: str, like_name: str, dtype: bool = True
) -> None:
    if t.device != like.device:
        raise ValueError(
            f"{name} is on {t.device} but {like_name} is on {like.device}; "
            f"move them to the same device"
        )
    if dtype and t.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {t.dtype} but {like_name} has dtype {like.dtype}; "
            f"convert them to the same dtype (or run under torch.autocast)"
        )


def check_params(
    params: Sequence[Optional[torch.Tensor]], names: Sequence[str], x: torch.Tensor, dtype: bool = True
) -> None:
    for p, n in zip(params, names):
        if p is not None:
            check_same(p, x, f"parameter {n}", "input", dtype)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``'s device, or None when autocast is off."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _expect(t: Optional[torch.Tensor], shape: Sequence[int], name: str) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_lengths(lengths, T: int, B: int, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``lengths``: None; an int32 / int64 tensor [B] on the CPU or x's device; or a list / tuple
    of B ints (made a CPU int64 tensor, as pack_padded_sequence does). Returns it as int64 on x's
    device. Its values must lie in [0, T] (0: that sequence's state passes through unchanged);
    they are read only from a CPU tensor and not under torch.compile, so a CUDA tensor costs no
    device sync and its values are the caller's to get right."""
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in lengths):
            raise TypeError(f"lengths given as a {type(lengths).__name__} must hold ints, got {lengths!r}")
        lengths = torch.tensor(lengths, dtype=torch.int64)
    elif not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be None, an int32 or int64 tensor, or a list of ints, "
                        f"got {type(lengths).__name__}")
    if lengths.dtype not in LENGTH_DTYPES:
        raise TypeError(f"lengths must be an integer tensor (int32 or int64), got {lengths.dtype}")
    if lengths.device.type != "cpu" and lengths.device != x.device:
        raise ValueError(f"lengths is on {lengths.device} but x is on {x.device}; "
                         f"lengths must be on the CPU or on x's device")
    _expect(lengths, (B,), "lengths")
    if lengths.device.type == "cpu" and B > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(lengths)
        if lo < 0 or hi > T:
            i = int(((lengths < 0) | (lengths > T)).nonzero()[0, 0])
            raise ValueError(f"lengths must lie in [0, T={T}] (x's time steps), "
                             f"got lengths[{i}] = {int(lengths[i])}")
    return lengths.to(device=x.device, dtype=torch.int64)


def check_sequence_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln=None, lengths=None, w_hr=None,
                        gates: int = 4, backend: str = "auto") -> Optional[torch.Tensor]:
    """The functional entry points' arguments (lstm_sequence: gates=4; rnn_sequence: gates=1, c0
    None): x [T, B, I], w_ih [gates·H, I], w_hh [gates·H, P], h0 [B, P], c0 [B, H], b_* [gates·H],
    ln (gate_weight, gate_bias [4H], cell_weight, cell_bias [H]), w_hr [P, H], lengths [B]; P = H
    without a projection. Every tensor a floating-point torch.Tensor (TypeError; their dtypes may
    differ) on x's device (ValueError); h0, c0, w_ih, w_hh required, the rest may be None; lengths
    as check_lengths, which returns it (int64 on x's device). Wrong shapes: a ValueError that
    names the argument, never a silent broadcast."""
    check_backend(backend)
    check_float(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [T, B, I] (time-major), got shape {tuple(x.shape)}")
    named = [(h0, "h0", False), (w_ih, "w_ih", False), (w_hh, "w_hh", False),
             (b_ih, "b_ih", True), (b_hh, "b_hh", True), (w_hr, "w_hr", True)]
    if gates == 4:
        named.insert(1, (c0, "c0", False))
    if ln is not None:
        if not isinstance(ln, (tuple, list)):
            raise TypeError(f"ln must be None or a tuple of 4 tensors {LN_PARTS}, got {type(ln).__name__}")
        if len(ln) != 4:
            raise ValueError(f"ln must be (gate_weight, gate_bias, cell_weight, cell_bias), got {len(ln)} tensors")
        for t, n in zip(ln, LN_PARTS):
            if t is None:
                raise TypeError(f"ln {n} is None: ln must be None (the plain LSTM) or 4 tensors {LN_PARTS}")
        named += [(t, f"ln {n}", False) for t, n in zip(ln, LN_PARTS)]
    for t, n, optional in named:
        check_float(t, n, optional)
        if t is not None:
            check_same(t, x, n, "x", dtype=False)
    T, B, I = x.shape
    if w_ih.dim() != 2 or w_ih.shape[1] != I or w_ih.shape[0] % gates:
        what = "[4H, I]" if gates == 4 else "[H, I]"
        raise ValueError(f"w_ih must be {what} with I={I} (x's last dimension), got shape {tuple(w_ih.shape)}")
    G = w_ih.shape[0]
    H = G // gates
    if w_hr is not None and (w_hr.dim() != 2 or w_hr.shape[1] != H):
        raise ValueError(f"w_hr must be [P, H={H}], got shape {tuple(w_hr.shape)}")
    P = H if w_hr is None else w_hr.shape[0]
    _expect(w_hh, (G, P), "w_hh")
    _expect(h0, (B, P), "h0")
    _expect(c0, (B, H), "c0")
    _expect(b_ih, (G,), "b_ih")
    _expect(b_hh, (G,), "b_hh")
    if ln is not None:
        for t, n, shape in zip(ln, LN_PARTS, ((G,), (G,), (H,), (H,))):
            _expect(t, shape, f"ln {n}")
    return check_lengths(lengths, T, B, x)
