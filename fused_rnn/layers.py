"""Drop-in replacements for torch.nn.LSTM / RNN / GRU / LSTMCell / RNNCell / GRUCell.

Each layer subclasses its torch.nn twin, so constructor arguments, parameter names and shapes,
``state_dict`` keys and the forward signature are torch.nn's own; only ``forward`` is ours. A
multi-layer or bidirectional layer composes the single-layer, single-direction sequence ops
(``lstm_sequence`` / ``rnn_sequence`` / ``gru_sequence``). Extra arguments:

- ``backend="auto" | "triton" | "reference"``: "auto" runs the Triton kernels on CUDA tensors;
  on CPU tensors, torch's own ATen ops for what torch.nn computes (fused_rnn/aten.py) and the
  whole-sequence route of fused_rnn/cpu_lstm.py for the layer-norm LSTM (fp32 / fp64), else the
  reference path (the readable time loop "reference" always runs);
- ``layer_norm=True`` (LSTM, LSTMCell): the seed's layer-norm LSTM. Its LayerNorm parameters are
  extra ``state_dict`` entries: ``ln_gate_weight_l{k}{_reverse}`` / ``ln_gate_bias_…`` [4H] (the
  four gate LayerNorms, gate order i, f, g, o) and ``ln_cell_weight_…`` / ``ln_cell_bias_…`` [H]
  (the LayerNorm of c_t before the output tanh).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import _validate as V
from . import aten
from ._backend import aten_route
from .gru import gru_sequence
from .lstm import lstm_sequence
from .rnn import rnn_sequence

LN_NAMES = ("ln_gate_weight", "ln_gate_bias", "ln_cell_weight", "ln_cell_bias")


def _make_ln_params(module: nn.Module, hidden_size: int, suffix: str, device, dtype) -> None:
    kw = dict(device=device, dtype=dtype)
    module.register_parameter(f"ln_gate_weight{suffix}", nn.Parameter(torch.ones(4 * hidden_size, **kw)))
    module.register_parameter(f"ln_gate_bias{suffix}", nn.Parameter(torch.zeros(4 * hidden_size, **kw)))
    module.register_parameter(f"ln_cell_weight{suffix}", nn.Parameter(torch.ones(hidden_size, **kw)))
    module.register_parameter(f"ln_cell_bias{suffix}", nn.Parameter(torch.zeros(hidden_size, **kw)))


def _reset_ln_params(module: nn.Module, suffixes) -> None:
    # nn.LayerNorm's init: weight 1, bias 0 (RNNBase.reset_parameters would make them uniform).
    with torch.no_grad():
        for sfx in suffixes:
            for n in LN_NAMES:
                getattr(module, n + sfx).fill_(1.0 if n.endswith("weight") else 0.0)


def _autocast(x: torch.Tensor, tensors):
    """Under torch.autocast, run in the autocast dtype as nn.LSTM does (parameters keep theirs)."""
    dtype = V.autocast_dtype(x)
    if dtype is None:
        return x, tensors
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return x.to(dtype), [cast(t) for t in tensors]


def _reverse_padded(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Reverse each sequence over its own length (padding stays in place); its own inverse."""
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    t = torch.arange(T, device=x.device).unsqueeze(1)
    L = lengths.unsqueeze(0)
    idx = torch.where(t < L, L - 1 - t, t)
    return x.gather(0, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _pack_like(out: torch.Tensor, packed: PackedSequence) -> PackedSequence:
    """Pack a padded, time-major output [T, B, F] (original batch order) like ``packed``."""
    if packed.sorted_indices is not None:
        out = out.index_select(1, packed.sorted_indices)
    bs = packed.batch_sizes.to(out.device)
    mask = torch.arange(out.shape[1], device=out.device).unsqueeze(0) < bs.unsqueeze(1)
    return PackedSequence(out[mask], packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


class _SequenceLayer:
    """The forward shared by LSTM, RNN and GRU: input forms, validation, layers × directions."""

    _is_lstm = False

    def _layer_param_names(self, layer: int, direction: int) -> List[Optional[str]]:
        """w_ih, w_hh, b_ih, b_hh (None without bias), w_hr (None without proj_size), then the
        LayerNorm parameters if any."""
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names: List[Optional[str]] = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
        names += [f"bias_ih{sfx}", f"bias_hh{sfx}"] if self.bias else [None, None]
        names.append(f"weight_hr{sfx}" if self.proj_size > 0 else None)
        if getattr(self, "layer_norm", False):
            names += [n + sfx for n in LN_NAMES]
        return names

    def _run_direction(self, x, h0, c0, params, lengths):
        w_ih, w_hh, b_ih, b_hh, w_hr = params[:5]
        if self._is_lstm:
            ln = tuple(params[5:]) if len(params) > 5 else None
            return lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, self.backend, w_hr,
                                 copy_output=False)  # _forward copies the layer's output if need be
        if self.mode == "GRU":
            out, h_n = gru_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, self.backend)
        else:
            out, h_n = rnn_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, self.nonlinearity, self.backend)
        return out, h_n, None

    def _forward(self, input, hx):
        packed = input if isinstance(input, PackedSequence) else None
        D = 2 if self.bidirectional else 1
        L = self.num_layers
        names = [n for l in range(L) for d in range(D) for n in self._layer_param_names(l, d)]
        flat = [None if n is None else getattr(self, n) for n in names]
        batched = V.check_layer_args(self, input if packed is None else packed.data, hx, flat, names,
                                     None if packed is None else packed.batch_sizes)
        if not getattr(self, "layer_norm", False) and aten_route(self.backend, flat[0]):
            done = aten.sequence(self, input, hx, flat, batched, _autocast)
            if done is not None:
                return done
        lengths = None
        if packed is not None:
            x, lengths = pad_packed_sequence(packed)  # time-major, original batch order
            # pad_packed_sequence returns the lengths on the CPU: test them there (no device sync)
            if bool((lengths == x.shape[0]).all()):
                lengths = None  # every sequence runs to the end: no masking needed
            else:
                lengths = lengths.to(x.device)
        else:
            x = input
            if not batched:
                x = x.unsqueeze(1)
            elif self.batch_first:
                x = x.transpose(0, 1)
        B = x.shape[1]
        H = self.hidden_size
        P = self.proj_size or H  # the width of h (nn.LSTM's proj_size; c stays H wide)

        # Initial states (checked above), as [L*D, B, P] / [L*D, B, H].
        if hx is None:
            h0 = x.new_zeros(L * D, B, P)
            c0 = x.new_zeros(L * D, B, H) if self._is_lstm else None
        else:
            h0, c0 = hx if self._is_lstm else (hx, None)
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = None if c0 is None else c0.unsqueeze(1)

        x, cast = _autocast(x, [h0, c0] + flat)
        h0, c0, flat = cast[0], cast[1], cast[2:]
        n = len(names) // (L * D)
        all_params = [flat[i * n:(i + 1) * n] for i in range(L * D)]

        h_n, c_n = [], []
        layer_in = x
        for l in range(L):
            outs = []
            for d in range(D):
                k = l * D + d
                inp = layer_in if d == 0 else _reverse_padded(layer_in, lengths)
                out, h, c = self._run_direction(
                    inp, h0[k], None if c0 is None else c0[k], all_params[k], lengths
                )
                outs.append(out if d == 0 else _reverse_padded(out, lengths))
                h_n.append(h)
                c_n.append(c)
            layer_in = outs[0] if D == 1 else torch.cat(outs, dim=-1)
            if self.dropout > 0 and self.training and l < L - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        # a single direction's output may be the kernels' saved h sequence (a view): the user
        # gets a copy where autograd records it, so that in-place ops on it work as on nn.LSTM's
        # (a bidirectional or packed output is a new tensor already; inner layers' are not copied)
        out = layer_in.clone() if layer_in.requires_grad and layer_in._base is not None else layer_in
        h_n = torch.stack(h_n)
        c_n = torch.stack(c_n) if self._is_lstm else None

        if packed is not None:
            out = _pack_like(out, packed)
        elif not batched:
            out = out.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, ((h_n, c_n) if self._is_lstm else h_n)


# The sequence layers derive from nn.RNNBase, not nn.LSTM / nn.RNN / nn.GRU: parameters, their names and
# init are torch.nn's own, while torch.compile (which refuses to trace isinstance(m, nn.LSTM))
# traces them like any module. So isinstance(m, nn.LSTM) is False; to_torch() below converts for
# code that wants torch.nn's classes. The cells derive from nn.LSTMCell / nn.RNNCell / nn.GRUCell.


class LSTM(_SequenceLayer, nn.RNNBase):
    """torch.nn.LSTM's drop-in replacement, plus ``layer_norm`` and ``backend``.

    Dropout between layers is torch's dropout. ``proj_size > 0``: h_t = W_hr (o_t * tanh(c_t)),
    as nn.LSTM (with ``layer_norm``, the projection follows the layer-norm cell); on the kernel
    backend it runs kernels/lstm_proj.py (cuBLAS products around the unfused pointwise kernels).
    """

    _is_lstm = True

    def __init__(self, *args, layer_norm: bool = False, backend: str = "auto", **kwargs):
        super().__init__("LSTM", *args, **kwargs)
        self.backend = V.check_backend(backend)
        self.layer_norm = bool(layer_norm)
        if self.layer_norm:
            w = self.weight_hh_l0
            for sfx in self._suffixes():
                _make_ln_params(self, self.hidden_size, sfx, w.device, w.dtype)

    def _suffixes(self):
        D = 2 if self.bidirectional else 1
        return [f"_l{l}" + ("_reverse" if d else "") for l in range(self.num_layers) for d in range(D)]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "layer_norm", False):
            _reset_ln_params(self, self._suffixes())

    def forward(self, input, hx=None):
        return self._forward(input, hx)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.layer_norm:
            s += ", layer_norm=True"
        return s + f", backend={self.backend!r}"


class RNN(_SequenceLayer, nn.RNNBase):
    """torch.nn.RNN's drop-in replacement (tanh or relu), plus ``backend``."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        # nn.RNN's argument handling: nonlinearity is the 4th positional argument.
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", *args, **kwargs)
        self.nonlinearity = nonlinearity
        self.backend = V.check_backend(backend)

    def forward(self, input, hx=None):
        return self._forward(input, hx)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


class GRU(_SequenceLayer, nn.RNNBase):
    """torch.nn.GRU's drop-in replacement (gates r, z, n; b_hn inside the reset product), plus
    ``backend``."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)
        self.backend = V.check_backend(backend)

    def forward(self, input, hx=None):
        return self._forward(input, hx)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


def _cell_state(hx, input, batched, hidden_size):
    return input.new_zeros((input.shape[0], hidden_size) if batched else (hidden_size,)) if hx is None else hx


def _cell_params(cell, input, hx, layer_norm):
    """The cell's parameters, once its arguments pass torch.nn's checks; and whether batched."""
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"] + (list(LN_NAMES) if layer_norm else [])
    params = [getattr(cell, n) for n in names]
    return params, V.check_cell_args(cell, input, hx, params, names)


class LSTMCell(nn.LSTMCell):
    """torch.nn.LSTMCell's drop-in replacement, plus ``layer_norm`` and ``backend``."""

    def __init__(self, *args, layer_norm: bool = False, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = V.check_backend(backend)
        self.layer_norm = bool(layer_norm)
        if self.layer_norm:
            w = self.weight_hh
            _make_ln_params(self, self.hidden_size, "", w.device, w.dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "layer_norm", False):
            _reset_ln_params(self, [""])

    def forward(self, input, hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        params, batched = _cell_params(self, input, hx, self.layer_norm)
        h0, c0 = (None, None) if hx is None else hx
        h0 = _cell_state(h0, input, batched, self.hidden_size)
        c0 = _cell_state(c0, input, batched, self.hidden_size)
        x = input if batched else input.unsqueeze(0)
        if not batched:
            h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
        x, cast = _autocast(x, [h0, c0] + params)
        h0, c0, (w_ih, w_hh, b_ih, b_hh, *ln) = cast[0], cast[1], cast[2:]
        if not ln and aten_route(self.backend, x) and V.same_dtype(x, cast):
            h, c = aten.lstm_cell(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
            return (h, c) if batched else (h.squeeze(0), c.squeeze(0))
        _, h, c = lstm_sequence(
            x.unsqueeze(0), h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(ln) if ln else None, None, self.backend,
            copy_output=False,  # the cell returns h_n, c_n only
        )
        if not batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.layer_norm:
            s += ", layer_norm=True"
        return s + f", backend={self.backend!r}"


def _one_state_step(cell, input, hx, aten_step, sequence):
    """The forward of a cell whose state is h alone (RNNCell, GRUCell): torch.nn's checks, then
    ``aten_step(x, h0, w_ih, w_hh, b_ih, b_hh)`` on the CPU route, else ``sequence(x [1, B, I],
    h0, w_ih, w_hh, b_ih, b_hh)`` -> h_n (the layer's backend)."""
    params, batched = _cell_params(cell, input, hx, False)
    h0 = _cell_state(hx, input, batched, cell.hidden_size)
    x = input if batched else input.unsqueeze(0)
    if not batched:
        h0 = h0.unsqueeze(0)
    x, cast = _autocast(x, [h0] + params)
    h0, (w_ih, w_hh, b_ih, b_hh) = cast[0], cast[1:]
    if aten_route(cell.backend, x) and V.same_dtype(x, cast):
        h = aten_step(x, h0, w_ih, w_hh, b_ih, b_hh)
    else:
        h = sequence(x.unsqueeze(0), h0, w_ih, w_hh, b_ih, b_hh)
    return h if batched else h.squeeze(0)


class RNNCell(nn.RNNCell):
    """torch.nn.RNNCell's drop-in replacement (tanh or relu), plus ``backend``."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = V.check_backend(backend)

    def forward(self, input, hx: Optional[torch.Tensor] = None):
        return _one_state_step(self, input, hx, lambda *a: aten.rnn_cell(*a, self.nonlinearity),
                               lambda *a: rnn_sequence(*a, None, self.nonlinearity, self.backend)[1])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


class GRUCell(nn.GRUCell):
    """torch.nn.GRUCell's drop-in replacement, plus ``backend``."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = V.check_backend(backend)

    def forward(self, input, hx: Optional[torch.Tensor] = None):
        return _one_state_step(self, input, hx, aten.gru_cell,
                               lambda *a: gru_sequence(*a, None, self.backend)[1])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


# torch.load(weights_only=True) may build our layers without the user allow-listing them. Loading
# one runs object.__new__ and torch's own RNNBase / Module.__setstate__, which only set attributes
# (the tensors come through torch's rebuild functions); a pickle that calls the class runs
# __init__, which only builds parameters, as nn.LSTM's does. So none of these classes may define
# __new__, __setstate__, __reduce__ or the like (tests/test_drop_in.py checks). Registered as
# (class, name) pairs: a user's `with safe_globals([fused_rnn.LSTM])` removes the bare class on
# exit, not these.
_LAYERS = (LSTM, RNN, GRU, LSTMCell, RNNCell, GRUCell)
if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    torch.serialization.add_safe_globals([(c, f"{c.__module__}.{c.__qualname__}") for c in _LAYERS])


def _torch_twin(m: nn.Module) -> nn.Module:
    kw = dict(bias=m.bias, device="meta")
    if type(m) is LSTM:
        twin = nn.LSTM(m.input_size, m.hidden_size, m.num_layers, batch_first=m.batch_first,
                       dropout=m.dropout, bidirectional=m.bidirectional, proj_size=m.proj_size, **kw)
    elif type(m) is RNN:
        twin = nn.RNN(m.input_size, m.hidden_size, m.num_layers, nonlinearity=m.nonlinearity,
                      batch_first=m.batch_first, dropout=m.dropout, bidirectional=m.bidirectional, **kw)
    elif type(m) is GRU:
        twin = nn.GRU(m.input_size, m.hidden_size, m.num_layers, batch_first=m.batch_first,
                      dropout=m.dropout, bidirectional=m.bidirectional, **kw)
    elif type(m) is LSTMCell:
        twin = nn.LSTMCell(m.input_size, m.hidden_size, **kw)
    elif type(m) is GRUCell:
        twin = nn.GRUCell(m.input_size, m.hidden_size, **kw)
    else:
        twin = nn.RNNCell(m.input_size, m.hidden_size, nonlinearity=m.nonlinearity, **kw)
    for name, p in m.named_parameters(recurse=False):
        setattr(twin, name, p)  # the same Parameter objects: an optimizer holding them still works
    return twin.train(m.training)


def to_torch(module: nn.Module, inplace: bool = False) -> nn.Module:
    """``module`` with every fused_rnn layer in it (``module`` itself included; not subclasses,
    whose own code would be lost) replaced by its torch.nn twin holding the same parameters, for
    code that wants torch.nn's exact classes, e.g. ``torch.ao.quantization.quantize_dynamic``,
    which leaves our layers as they are. Without ``inplace`` the model is copied first. A
    layer-norm LSTM has no twin: ValueError."""
    for m in module.modules():  # refuse before changing anything
        if type(m) in _LAYERS and getattr(m, "layer_norm", False):
            raise ValueError(f"{type(m).__name__}(layer_norm=True) has no torch.nn equivalent")
    if not inplace:
        module = copy.deepcopy(module)
    if type(module) in _LAYERS:
        return _torch_twin(module)
    done = {}
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):  # named_children() skips repeats
            if type(child) in _LAYERS:
                if id(child) not in done:  # a layer shared by two parents stays shared
                    done[id(child)] = _torch_twin(child)
                setattr(parent, name, done[id(child)])
    return module
