"""The CPU route through ATen's RNN/LSTM ops: torch's own implementation of the math torch.nn
computes, run with the layer's own parameters.

``backend="auto"`` on a CPU tensor takes it (fused_rnn._backend.aten_route) for every
configuration torch.nn.LSTM / RNN / GRU and their cells compute: no layer norm; projections,
layers, directions, batch_first, dropout in training, PackedSequence and initial states all as
nn.LSTM passes them to torch._VF.lstm / rnn_tanh / rnn_relu / gru (torch/nn/modules/rnn.py).
Dropout between layers is ATen's, applied where fused_rnn's own loop applies it (each inner layer's
output, both directions concatenated). ``backend="reference"`` stays the readable time loop.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._validate import same_dtype

_SEQUENCE_OPS = {"LSTM": "lstm", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu", "GRU": "gru"}


def call(name: str, *args):
    """torch._VF.<name>(*args): the one place the route calls ATen (tests spy on it)."""
    return getattr(torch._VF, name)(*args)


def sequence(layer, input, hx, flat: List[Optional[torch.Tensor]], batched: bool, cast):
    """The layer's forward through ATen, or None where the route cannot take the arguments
    (mixed dtypes outside autocast: the caller runs its own loop). ``flat``: the parameters in
    nn.LSTM's order, None for an absent bias or projection; ``cast``: the layer's autocast
    function (x, tensors) -> (x, tensors)."""
    packed = input if isinstance(input, PackedSequence) else None
    lstm = layer.mode == "LSTM"
    D = 2 if layer.bidirectional else 1
    if packed is not None:
        x, B = packed.data, int(packed.batch_sizes[0])
    else:
        x = input if batched else input.unsqueeze(1)
        B = x.shape[0 if (batched and layer.batch_first) else 1]
    H = layer.hidden_size
    P = layer.proj_size if lstm and layer.proj_size > 0 else H
    if hx is None:
        h0 = x.new_zeros(layer.num_layers * D, B, P)
        c0 = x.new_zeros(layer.num_layers * D, B, H) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
        if not batched:
            h0, c0 = h0.unsqueeze(1), (None if c0 is None else c0.unsqueeze(1))
        elif packed is not None and packed.sorted_indices is not None:
            h0 = h0.index_select(1, packed.sorted_indices)
            c0 = None if c0 is None else c0.index_select(1, packed.sorted_indices)
    x, tensors = cast(x, [h0, c0] + flat)
    h0, c0, weights = tensors[0], tensors[1], [w for w in tensors[2:] if w is not None]
    if not same_dtype(x, [h0, c0] + weights):
        return None
    state = (h0, c0) if lstm else h0
    common = (layer.bias, layer.num_layers, float(layer.dropout), layer.training, layer.bidirectional)
    op = _SEQUENCE_OPS[layer.mode]
    if packed is not None:
        res = call(op, x, packed.batch_sizes, state, weights, *common)
    else:
        res = call(op, x, state, weights, *common, batched and layer.batch_first)
    out, hidden = res[0], tuple(res[1:])
    if packed is not None:
        out = PackedSequence(out, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        if packed.unsorted_indices is not None:
            hidden = tuple(h.index_select(1, packed.unsorted_indices) for h in hidden)
    elif not batched:
        out, hidden = out.squeeze(1), tuple(h.squeeze(1) for h in hidden)
    return out, (hidden if lstm else hidden[0])


def single_layer(mode: str, x, state, params, lengths):
    """One layer, one direction of lstm_sequence / rnn_sequence through ATen (the functional
    API's CPU route): x [T, B, I], ``state`` (h0, c0) or (h0,), ``params`` [w_ih, w_hh, b_ih,
    b_hh] plus [w_hr] for a projection, None where absent; ``lengths`` None or [B], run as a
    PackedSequence (pad_packed_sequence gives 0 past each end, as the reference loop). -> (out,
    *final states), or None where ATen cannot take the arguments (mixed dtypes, CPU autocast,
    a length 0: the caller runs its own loop)."""
    w_ih, w_hh, b_ih, b_hh = params[:4]
    if (b_ih is None) != (b_hh is None):  # ATen takes both biases or none
        b_ih = torch.zeros_like(b_hh) if b_ih is None else b_ih
        b_hh = torch.zeros_like(b_ih) if b_hh is None else b_hh
    weights = [w for w in [w_ih, w_hh, b_ih, b_hh] + list(params[4:]) if w is not None]
    if not same_dtype(x, list(state) + weights) or torch.is_autocast_enabled("cpu"):
        return None
    hx = [s.unsqueeze(0) for s in state]
    common = (b_ih is not None, 1, 0.0, False, False)
    op = _SEQUENCE_OPS[mode]
    if lengths is None:
        res = call(op, x, tuple(hx) if mode == "LSTM" else hx[0], weights, *common, False)
        return (res[0],) + tuple(h.squeeze(0) for h in res[1:])
    lengths = lengths.cpu()
    if bool((lengths == 0).any()):  # a PackedSequence holds no empty sequence
        return None
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    hx = [h.index_select(1, packed.sorted_indices) for h in hx]
    res = call(op, packed.data, packed.batch_sizes, tuple(hx) if mode == "LSTM" else hx[0], weights, *common)
    out = pad_packed_sequence(PackedSequence(res[0], packed.batch_sizes, packed.sorted_indices,
                                             packed.unsorted_indices), total_length=x.shape[0])[0]
    return (out,) + tuple(h.index_select(1, packed.unsorted_indices).squeeze(0) for h in res[1:])


def lstm_cell(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """One LSTMCell step through ATen (batched arguments, one dtype) -> (h, c)."""
    return call("lstm_cell", x, (h0, c0), w_ih, w_hh, b_ih, b_hh)


def rnn_cell(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity: str):
    """One RNNCell step through ATen (batched arguments, one dtype) -> h."""
    return call(f"rnn_{nonlinearity}_cell", x, h0, w_ih, w_hh, b_ih, b_hh)


def gru_cell(x, h0, w_ih, w_hh, b_ih, b_hh):
    """One GRUCell step through ATen (batched arguments, one dtype) -> h."""
    return call("gru_cell", x, h0, w_ih, w_hh, b_ih, b_hh)
