"""tanh (or ReLU) RNN over a whole sequence (one layer, one direction).

``rnn_sequence`` is the single entry point the layers call; it dispatches to the Triton
autograd Function or to the reference path.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import resolve_backend
from .reference import rnn_sequence_ref


def rnn_sequence(
    x: torch.Tensor,
    h0: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: Optional[torch.Tensor] = None,
    b_hh: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    nonlinearity: str = "tanh",
    backend: str = "auto",
):
    """x [T, B, I], h0 [B, H], w_ih [H, I], w_hh [H, H], b_* [H] or None,
    lengths None or int64 [B] on x's device -> (out [T, B, H], h_n [B, H])."""
    resolve_backend(backend, x)
    # TODO(kernels issue): the Triton path; until then every backend runs the reference.
    return rnn_sequence_ref(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, nonlinearity)
