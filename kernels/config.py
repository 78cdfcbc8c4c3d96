"""What the kernels take, how they store it, and their switches. Torch only: fused_rnn reads it
without importing Triton.

Buffer dtypes (docs/design.md, "Buffer dtypes"):
    state dtype    fp64 for fp64 inputs, else fp32: the carried c and gradients, all arithmetic.
    operand dtype  the storage dtype for fp16 / bf16 inputs, else the state dtype: buffers read
                   only by tensor-core matmuls (the LSTM's hs, dG / dP, the plain LSTM's gates
                   and saved c).
    The RNN's hs (tanh' = 1 - h² needs its precision), the GRU's hs and saved gates (its slopes
    and h_{t-1} - n cancel) and the layer-norm LSTM's gates and c (its backward recomputes the
    LayerNorm statistics from them) stay in the state dtype.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Optional, Tuple

import torch

# Inputs, weights and states share one of these.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
LN_EPS = 1e-5  # nn.LayerNorm's default, as in the seed's layer-norm LSTM

# Size limits. The layer-norm step kernels hold whole rows of next_pow2(H); the fused one (the
# recurrent matmul inside) spills above 128 units at sm_90, 64 in fp64.
LN_MAX_H = 4096
LN_FUSED_MAX_H = 128
LN_FUSED_MAX_H_FP64 = 64
PERSISTENT_MAX_B = 64  # rows per row block of a persistent launch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in HALF_DTYPES else state_dtype(dtype)


def lstm_hs_dtype(dtype: torch.dtype) -> torch.dtype:
    return operand_dtype(dtype)


def lstm_gates_dtype(dtype: torch.dtype, layer_norm: bool) -> torch.dtype:
    return state_dtype(dtype) if layer_norm else operand_dtype(dtype)


def lstm_cs_dtype(dtype: torch.dtype, layer_norm: bool) -> torch.dtype:
    """The saved c, read only by the backward (the kernels carry c in the state dtype)."""
    return state_dtype(dtype) if layer_norm else operand_dtype(dtype)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dG (LSTM) and dP (RNN)."""
    return operand_dtype(dtype)


def ln_fused_max_h(dtype: torch.dtype) -> int:
    return LN_FUSED_MAX_H_FP64 if dtype == torch.float64 else LN_FUSED_MAX_H


def default_fused(H: int, ln, dtype: torch.dtype) -> bool:
    """Whether the LSTM's step path runs the fused kernels (recurrent matmul inside) by default:
    always for the plain LSTM, up to ln_fused_max_h for the layer-norm one (ln: None or its
    parameters)."""
    return ln is None or H <= ln_fused_max_h(dtype)


def zero_padding(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """x [T, B, ...] with the steps past each sequence's end set to 0 by a where (0 x NaN is NaN:
    no multiply by a mask), so NaN / Inf padding reaches no result or gradient. The launchers
    and the reference path both use it."""
    if lengths is None:
        return x
    valid = torch.arange(x.shape[0], device=x.device).unsqueeze(1) < lengths.to(x.device).unsqueeze(0)
    return torch.where(valid.view(valid.shape + (1,) * (x.dim() - 2)), x, x.new_zeros(()))


@dataclasses.dataclass(frozen=True)
class Options:
    """The kernels' variant and debug switches, read at each launch. Process-wide: tests and
    bench/persistent_tune.py set them with ``using(...)``; the defaults are what users get.
    docs/design.md says which variants are measured."""

    poison: bool = False  # fill every buffer a kernel must write with NaN (tests)
    save_gates: bool = True  # the LSTM forward saves its gates (else the backward recomputes)
    step_tiles: Tuple[Tuple[str, int], ...] = ()  # forced step tiles: BLOCK_B/H/K, num_warps
    plan_block_h: Optional[int] = None  # persistent plans: forced BLOCK_H (16, 32, 64)
    plan_num_warps: Optional[int] = None  # persistent plans: forced num_warps
    ll_sync: bool = False  # persistent: flag-in-data exchange instead of the grid barrier
    solo: bool = False  # persistent: one program per row block holding all of W_hh
    w_chunked: bool = True  # persistent: W_hh over the whole-tile limits kept on chip in chunks
    early_arrive: bool = True  # persistent: arrive right after the exchanged stores
    cooperative_launch: bool = True  # persistent on CUDA: a cooperative launch
    merge_c: Optional[bool] = None  # LN persistent forward: 2 barriers a step (None: the rule)
    merge_bwd: bool = False  # LN persistent backward: 2 barriers a step
    direct_launch: bool = True  # step path: launch the bound kernel after a step's first (_common.StepLauncher)

    def __post_init__(self):
        tiles = self.step_tiles.items() if isinstance(self.step_tiles, dict) else self.step_tiles
        object.__setattr__(self, "step_tiles", tuple(sorted((str(k), int(v)) for k, v in tiles)))
        bad = {k for k, _ in self.step_tiles} - {"BLOCK_B", "BLOCK_H", "BLOCK_K", "num_warps"}
        if bad:
            raise ValueError(f"step_tiles: unknown keys {sorted(bad)}")


_options = Options()
_lock = threading.Lock()


def options() -> Options:
    """The switches in force."""
    return _options


@contextlib.contextmanager
def using(**changes):
    """Run the block with these fields of Options changed (``step_tiles`` takes a dict), then
    restore the previous options."""
    global _options
    with _lock:
        before = _options
        _options = dataclasses.replace(before, **changes)
    try:
        yield _options
    finally:
        with _lock:
            _options = before
