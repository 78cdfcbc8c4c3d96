"""LSTM and layer-norm LSTM over a whole sequence (one layer, one direction).

``lstm_sequence`` is the single entry point the layers call; it dispatches to the Triton
autograd Function or to the reference path.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._backend import resolve_backend
from .reference import LN_EPS, lstm_sequence_ref


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
):
    """x [T, B, I], h0/c0 [B, H], w_ih [4H, I], w_hh [4H, H], b_* [4H] or None,
    ln None or (gate_weight [4H], gate_bias [4H], cell_weight [H], cell_bias [H]),
    lengths None or int64 [B] on x's device -> (out [T, B, H], h_n [B, H], c_n [B, H])."""
    resolve_backend(backend, x)
    # TODO(kernels issue): the Triton path; until then every backend runs the reference.
    return lstm_sequence_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln, lengths, LN_EPS)
