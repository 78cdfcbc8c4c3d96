"""Argument checks shared by the layers and the functional entry points, raised before any
backend is chosen (so the same on every backend), never a silent broadcast. Where torch.nn checks
the same thing the layers raise its exception type with its message (fused_rnn's detail follows
in parentheses), in torch's order; the checks torch lacks are fused_rnn's own, naming the
argument and what is allowed."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

from ._backend import BACKENDS
from .kernels import config

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
    if t.dtype not in config.SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )


def _tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _state_list(hx, lstm: bool, name: str):
    """The initial states as a list: [] for None, [h_0] (RNN), [h_0, c_0] (LSTM). An LSTM's hx
    not a tuple: TypeError (as torch's op raises); a tuple not of two: torch's RuntimeError; a
    state not a tensor: TypeError (fused_rnn's check: torch.nn fails inside its own code)."""
    if hx is None:
        return []
    if lstm:
        if not isinstance(hx, (tuple, list)):
            raise TypeError(f"hx must be a tuple (h_0, c_0) for an {name}, got {type(hx).__name__}")
        if len(hx) != 2:
            op = "lstm_cell" if name == "LSTMCell" else "lstm"
            raise RuntimeError(f"{op} expects two hidden states (hx must be (h_0, c_0), got {len(hx)} tensors)")
        _tensor(hx[0], "hx[0] (h_0)")
        _tensor(hx[1], "hx[1] (c_0)")
        return list(hx)
    if not isinstance(hx, torch.Tensor):
        raise TypeError(f"hx must be a tensor for {'a' if name == 'GRU' else 'an'} {name}, got {type(hx).__name__}")
    return [hx]


def _dtype_vs_weights(x, params, names) -> None:
    """torch.nn's check of the input's dtype against the weights' (skipped under autocast): a
    ValueError in torch's words; fused_rnn checks every parameter, not only the first."""
    for i, (p, n) in enumerate(zip(params, names)):
        if p is not None and p.dtype != x.dtype:
            raise ValueError(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({p.dtype}). Convert input: "
                f"input.to({p.dtype}), or convert model: model.to({x.dtype})" + (f" (parameter {n})" if i else "")
            )


def _devices(x, params, names, states, state_names) -> None:
    """torch's RNN device checks: a RuntimeError in its words, naming the tensor."""
    for p, n in zip(params, names):
        if p is not None and p.device != x.device:
            raise RuntimeError(
                f"Input and parameter tensors are not at the same device, found input tensor at "
                f"{x.device} and parameter tensor at {p.device} (parameter {n})"
            )
    for h, n in zip(states, state_names):
        if h.device != x.device:
            raise RuntimeError(
                f"Input and hidden tensors are not at the same device, found input tensor at "
                f"{x.device} and hidden tensor at {h.device} ({n})"
            )


def _state_dtypes(x, states, state_names) -> None:
    """torch's (cuDNN's) check of the states' dtype against the input's: a RuntimeError in its
    words (torch's CPU path raises a RuntimeError from its matmul there)."""
    for h, n in zip(states, state_names):
        if h.dtype != x.dtype:
            raise RuntimeError(
                f"Input and hidden tensors are not the same dtype, found input tensor with {x.dtype} and "
                f"hidden tensor with {h.dtype} ({n}); convert them to the same dtype (or run under torch.autocast)"
            )


def check_layer_args(layer, input, hx, params, names, batch_sizes=None) -> bool:
    """The checks of torch.nn.RNN / LSTM's forward, in torch's order, with its exception types and
    messages (what fused_rnn adds follows in parentheses), plus fused_rnn's own: tensors where
    tensors belong (TypeError), a floating-point input, the states' dtype. ``input``: the tensor
    given, or a PackedSequence's data with its ``batch_sizes``; ``params`` / ``names``: the
    layer's parameters in order (weight_ih_l0 first). Under autocast dtypes may differ, as in
    torch. Returns whether the input is batched."""
    lstm = layer.mode == "LSTM"
    cls = layer.mode if layer.mode in ("LSTM", "GRU") else "RNN"
    _tensor(input, "input")
    same_dtype = autocast_dtype(input) is None
    if batch_sizes is None and input.dim() not in (2, 3):
        tensor = "" if cls != "RNN" else " tensor"
        raise ValueError(f"{cls}: Expected input to be 2D or 3D, got {input.dim()}D{tensor} instead "
                         f"(input shape {tuple(input.shape)})")
    batched = batch_sizes is not None or input.dim() == 3
    states = _state_list(hx, lstm, cls)
    state_names = ["hx[0] (h_0)", "hx[1] (c_0)"] if lstm else ["hx (h_0)"]
    if states and batch_sizes is None:
        want = 3 if batched else 2
        if any(h.dim() != want for h in states):
            kind = "batched 3-D" if batched else "unbatched 2-D"
            if lstm:
                got = f"({states[0].dim()}-D, {states[1].dim()}-D) tensors"
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got {got}")
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {states[0].dim()}-D tensor")
    if same_dtype:
        _dtype_vs_weights(input, params, names)
    check_float(input, "input")
    if input.shape[-1] != layer.input_size:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {layer.input_size}, "
                           f"got {input.shape[-1]}")
    if batch_sizes is not None:
        N = int(batch_sizes[0])
    else:
        N = (input.shape[0] if layer.batch_first else input.shape[1]) if batched else 1
    LD = layer.num_layers * (2 if layer.bidirectional else 1)
    expected = [(LD, N, layer.proj_size or layer.hidden_size), (LD, N, layer.hidden_size)]
    labels = ["hidden[0] ", "hidden[1] "] if lstm else ["hidden "]
    for h, n, shape, label in zip(states, state_names, expected, labels):
        got = tuple(h.shape) if batched else tuple(h.unsqueeze(1).shape)
        if got != shape:
            raise RuntimeError(f"Expected {label}size {shape}, got {list(got)} ({n})")
    _devices(input, params, names, states, state_names)
    T = input.shape[1] if batched and layer.batch_first and batch_sizes is None else input.shape[0]
    if T == 0:
        raise RuntimeError(f"Expected sequence length to be larger than 0 in RNN (input shape {tuple(input.shape)})")
    if same_dtype:
        _state_dtypes(input, states, state_names)
    for h, n in zip(states, state_names):
        check_float(h, n)
    return batched


def check_cell_args(cell, input, hx, params, names) -> bool:
    """The checks of torch.nn.RNNCell / LSTMCell's forward, in torch's order, with its exception
    types and messages (what fused_rnn adds follows in parentheses), plus fused_rnn's own: tensors
    where tensors belong (TypeError), a floating-point input, states of exactly the expected shape
    (torch's checks pass an unbatched (H,) input with an (N, H) state through to its matmul).
    Where torch's own matmul is what fails (dtypes, devices) the error is its RuntimeError.
    Returns whether the input is batched."""
    lstm = isinstance(cell, torch.nn.LSTMCell)
    cls = "LSTMCell" if lstm else ("GRUCell" if isinstance(cell, torch.nn.GRUCell) else "RNNCell")
    _tensor(input, "input")
    same_dtype = autocast_dtype(input) is None
    if input.dim() not in (1, 2):
        raise ValueError(f"{cls}: Expected input to be 1D or 2D, got {input.dim()}D instead "
                         f"(input shape {tuple(input.shape)})")
    states = _state_list(hx, lstm, cls)
    state_names = ["hx[0] (h_0)", "hx[1] (c_0)"] if lstm else ["hx (h_0)"]
    for i, h in enumerate(states):
        if h.dim() not in (1, 2):
            what = f"hx[{i}]" if lstm else "hidden"
            raise ValueError(f"{cls}: Expected {what} to be 1D or 2D, got {h.dim()}D instead")
    if cls == "RNNCell" and cell.nonlinearity not in NONLINEARITIES:
        raise RuntimeError(f"Unknown nonlinearity: {cell.nonlinearity}")
    batched = input.dim() == 2
    N, H = (input.shape[0] if batched else 1), cell.hidden_size
    if input.shape[-1] != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[-1]} expected {cell.input_size}")
    for k, (h, n) in enumerate(zip(states, state_names)):
        hb = h if batched else h.unsqueeze(0)  # torch's view of the state
        if hb.shape[0] != N:
            raise RuntimeError(f"Input batch size {N} doesn't match hidden{k} batch size {hb.shape[0]} ({n})")
        want = (N, H) if batched else (H,)
        if hb.dim() >= 2 and hb.shape[1] != H:
            raise RuntimeError(f"hidden{k} has inconsistent hidden_size: got {hb.shape[1]}, expected {H} "
                               f"({n} must have shape {want}, got {tuple(h.shape)})")
        if tuple(h.shape) != want:  # fused_rnn's: torch passes these to its op, which broadcasts
            raise RuntimeError(f"{n} must have shape {want}, got {tuple(h.shape)}")
    for p, n in zip(params, names):
        if p is not None and p.device != input.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                               f"{input.device} and parameter tensor at {p.device} (parameter {n})")
        if same_dtype and p is not None and p.dtype != input.dtype:
            raise RuntimeError(f"input and parameter {n} must have the same dtype, but got {input.dtype} and "
                               f"{p.dtype}; convert them to the same dtype (or run under torch.autocast)")
    check_float(input, "input")
    for h, n in zip(states, state_names):
        if h.device != input.device:
            raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor at "
                               f"{input.device} and hidden tensor at {h.device} ({n})")
        if same_dtype and h.dtype != input.dtype:
            raise RuntimeError(f"input and {n} must have the same dtype, but got {input.dtype} and {h.dtype}; "
                               f"convert them to the same dtype (or run under torch.autocast)")
        check_float(h, n)
    return batched


def check_same(t: torch.Tensor, like: torch.Tensor, name: str, like_name: str) -> None:
    """The functional entry points' device check (the layers use torch.nn's, above)."""
    if t.device != like.device:
        raise ValueError(
            f"{name} is on {t.device} but {like_name} is on {like.device}; "
            f"move them to the same device"
        )


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
    """The functional entry points' arguments (lstm_sequence: gates=4; rnn_sequence: gates=1 and
    gru_sequence: gates=3, c0 None): x [T, B, I], w_ih [gates·H, I], w_hh [gates·H, P], h0 [B, P],
    c0 [B, H], b_* [gates·H], ln (gate_weight, gate_bias [4H], cell_weight, cell_bias [H]),
    w_hr [P, H], lengths [B]; P = H without a projection. Every tensor a floating-point
    torch.Tensor (TypeError; their dtypes may differ) on x's device (ValueError); h0, c0, w_ih,
    w_hh required, the rest may be None; lengths as check_lengths, which returns it (int64 on x's
    device). Wrong shapes: a ValueError that names the argument, never a silent broadcast."""
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
            check_same(t, x, n, "x")
    T, B, I = x.shape
    if w_ih.dim() != 2 or w_ih.shape[1] != I or w_ih.shape[0] % gates:
        what = f"[{gates}H, I]" if gates > 1 else "[H, I]"
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


def same_dtype(x: torch.Tensor, tensors) -> bool:
    """Every tensor of ``tensors`` that is not None has x's dtype (the kernels take one dtype)."""
    return all(t is None or t.dtype == x.dtype for t in tensors)
