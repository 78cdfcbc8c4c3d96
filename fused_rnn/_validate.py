"""Argument checks shared by the layers: clear errors that name the argument and the shape
expected, as torch.nn does, and never a silent broadcast."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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


def check_sequence_args(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln=None, lengths=None, w_hr=None,
                        gates: int = 4) -> None:
    """The functional entry points' shapes (lstm_sequence: gates=4; rnn_sequence: gates=1, c0
    None): x [T, B, I], w_ih [gates·H, I], w_hh [gates·H, P], h0 [B, P], c0 [B, H], b_* [gates·H],
    ln (gate_weight, gate_bias [4H], cell_weight, cell_bias [H]), w_hr [P, H], lengths [B]; P = H
    without a projection. A ValueError that names the argument, never a silent broadcast."""
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D [T, B, I] (time-major), got shape {tuple(x.shape)}")
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
        if len(ln) != 4:
            raise ValueError(f"ln must be (gate_weight, gate_bias, cell_weight, cell_bias), got {len(ln)} tensors")
        for t, n, shape in zip(ln, ("gate_weight", "gate_bias", "cell_weight", "cell_bias"), ((G,), (G,), (H,), (H,))):
            _expect(t, shape, f"ln {n}")
    _expect(lengths, (B,), "lengths")
