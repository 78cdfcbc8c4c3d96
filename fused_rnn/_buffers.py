"""The dtypes of the kernels' saved and gradient buffers: one policy, shared by the launchers
(fused_rnn.kernels) and the custom ops' fake implementations (fused_rnn._ops, which must not
import Triton).

state dtype    fp64 for fp64 inputs, fp32 otherwise: the carried c, the carried gradients, and
               everything a kernel computes in.
operand dtype  for fp16 / bf16 inputs, the storage dtype itself; otherwise the state dtype. For
               buffers whose only readers are matmuls on tensor cores (the recurrent tl.dot, which
               rounds its operands to the weights' dtype anyway, and the GEMMs after the backward
               loop): h_t of the LSTM (hs), the pre-activation gradients (dG, dP), and the plain
               LSTM's saved gates. Storing them in 16 bits halves their memory and traffic, and
               lets the weight- and input-gradient GEMMs run in bf16/fp16 on tensor cores instead
               of in fp32 (at S3, B256 T256 H1024, those three GEMMs are 1.65 TFLOP).
The plain LSTM's saved c follows the same rule (lstm_cs_dtype: only the backward reads it).
Exceptions, kept in the state dtype: the RNN's hs (its backward takes tanh' = 1 - h² from it,
which loses all precision near |h| = 1 when h is rounded to 8 bits of mantissa) and the
layer-norm LSTM's gates and c (its backward recomputes the LayerNorm statistics from them;
rounding a row whose spread is small next to its mean would wreck the normalised values).
"""
from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in HALF_DTYPES else state_dtype(dtype)


def lstm_hs_dtype(dtype: torch.dtype) -> torch.dtype:
    return operand_dtype(dtype)


def lstm_gates_dtype(dtype: torch.dtype, layer_norm: bool) -> torch.dtype:
    return state_dtype(dtype) if layer_norm else operand_dtype(dtype)


def lstm_cs_dtype(dtype: torch.dtype, layer_norm: bool) -> torch.dtype:
    """The saved c sequence. The kernels carry c in the state dtype (registers, or the step
    path's own [2, B, H] carry buffer), so the forward is unchanged; the saved copy is read only
    by the backward, as tanh(c_t) and c_{t-1} factors, where 16 bits cost nothing measurable
    (B17 T12 H64 with lengths, interpreter, against fp64 on the same rounded inputs: worst
    gradient error bf16 7.73e-3 with an fp32 cs, 7.57e-3 with a bf16 one; fp16 5.73e-4 and
    5.71e-4). The layer-norm LSTM's stays in the state dtype: its backward recomputes the c
    LayerNorm's statistics from it."""
    return state_dtype(dtype) if layer_norm else operand_dtype(dtype)


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dG (LSTM) and dP (RNN)."""
    return operand_dtype(dtype)
