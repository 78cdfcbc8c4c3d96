"""The step kernels' tiles: (BLOCK_B, BLOCK_H, BLOCK_K, num_warps) for each launch of
kernels/lstm.py, lstm_proj.py and rnn.py, in one place.

The rules keep every step kernel free of register spills at sm_90 (tests/test_sm90_compile.py
checks it; the registers behind each choice are in docs/step-kernels.md). The fused plain LSTM
and RNN take the 16- or 64-row, 16- or 32-unit tile with the least estimated step time
(step_tile: a bandwidth and dot-rate model of an H100, not a timing). ``options().step_tiles``
(tests, bench/persistent_tune.py --step) replaces whatever fields it names.
"""
from __future__ import annotations

import torch
import triton

from . import config

# Rough H100 SXM rates for step_time_us (docs/step-kernels.md): L2 to all SMs, into one SM, and
# one SM's dot rate by operand bytes (16-bit: half the dense tensor-core peak; fp32: FMA rate).
L2_BYTES_PER_US = 5.5e6
SM_BYTES_PER_US = 0.112e6
SM_FLOP_PER_US = {2: 3.75e6, 4: 0.51e6}
DEFAULT_SM_COUNT = 132  # an H100 SXM: what the estimate assumes off CUDA (the interpreter)
_SM_COUNT: dict = {}


def pow2_block(n: int, lo: int, hi: int) -> int:
    """next_pow2(n) clamped to [lo, hi] (lo, hi powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def sm_count(device) -> int:
    """The SM count of a CUDA device (cached); DEFAULT_SM_COUNT for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = int(torch.cuda.get_device_properties(idx).multi_processor_count)
    return _SM_COUNT[idx]


def step_time_us(B: int, H: int, K: int, gates: int, BB: int, BH: int, w_elt: int, row_elt: int,
                 n_sm: int) -> float:
    """The estimated µs of one fused step: cdiv(B, BB) x cdiv(H, BH) programs, each reading a
    W_hh slice of gates x BH x H elements of w_elt bytes and min(BB, B) operand rows of K
    elements of row_elt bytes, and multiplying BB rows by gates x BH columns over K. The longer
    of the total bytes over the L2's bandwidth and each SM's share (its programs in waves of one
    per SM: bytes over one SM's bandwidth, or dots over its rate, whichever is longer)."""
    nrb, ncb = triton.cdiv(B, BB), triton.cdiv(H, BH)
    w_slice = gates * BH * H * w_elt
    total = nrb * ncb * w_slice + ncb * B * K * row_elt
    per_program = max((w_slice + min(BB, B) * K * row_elt) / SM_BYTES_PER_US,
                      2 * BB * gates * BH * K / SM_FLOP_PER_US[w_elt])
    waves = triton.cdiv(nrb * ncb, n_sm)
    return max(total / L2_BYTES_PER_US, waves * per_program)


def step_tile(B: int, H: int, K: int, gates: int, w_elt: int, row_elt: int, n_sm: int):
    """(BLOCK_B, BLOCK_H, num_warps) of a fused step kernel: 16 or 64 rows (64 only for B >= 64)
    x 16 or 32 units (32 only for H > 16), the one step_time_us() estimates fastest (on a tie the
    earlier of 16 x 32, 16 x 16, 64 x 32, 64 x 16); 4 warps for 16 rows, 8 for 64. Larger row
    blocks read W_hh fewer times a step and use wgmma; more programs keep more SMs busy."""
    tiles = [(16, 32), (16, 16), (64, 32), (64, 16)]
    tiles = [(bb, bh) for bb, bh in tiles if (bb == 16 or B >= 64) and (bh == 16 or H > 16)]
    est = [step_time_us(B, H, K, gates, bb, bh, w_elt, row_elt, n_sm) for bb, bh in tiles]
    BB, BH = tiles[est.index(min(est))]
    return BB, BH, 8 if BB == 64 else 4


def step_override(BB: int, BH: int, BK: int, nw: int):
    """The tile with options().step_tiles applied (the fields it names replace the rule's)."""
    o = dict(config.options().step_tiles)
    return (o.get("BLOCK_B", BB), o.get("BLOCK_H", BH), o.get("BLOCK_K", BK), o.get("num_warps", nw))


def lstm_blocks(B: int, H: int, direction: str, fused: bool, ln: bool, dtype: torch.dtype,
                n_sm: int = DEFAULT_SM_COUNT):
    """The LSTM step kernels' tile in ``direction`` ("fwd": the recurrent matmul's K is H; "bwd":
    4H). tl.dot needs every block dim >= 16 on a GPU; the layer-norm kernels hold whole rows.
    fp64 (the gradcheck dtype; its speed is no goal) keeps a simple rule that spills in places."""
    K = H if direction == "fwd" else 4 * H
    BH = pow2_block(H, 16, max(16, triton.next_power_of_2(H))) if ln else pow2_block(H, 16, 32)
    if dtype == torch.float64:
        if fused:
            BB = 16
        else:
            BB = pow2_block(B, 1, max(1, min(16, 2048 // BH)) if ln else 16)
        return step_override(BB, BH, 8, 8 if BB * BH >= 4096 else 4)
    if ln:
        if fused:  # 16 rows of next_pow2(H) <= config.LN_FUSED_MAX_H units
            BB = 16
            if BH <= 32:
                BK, nw = (32 if direction == "fwd" else 64), 4
            elif BH == 64:
                BK, nw = (32 if direction == "fwd" else 64), 8
            else:  # 128
                BK = 16
                nw = 16 if direction == "fwd" and dtype == torch.float32 else 8
            return step_override(BB, BH, pow2_block(K, 16, BK), nw)
        # the unfused pointwise kernel: <= 1024 elements a program where a row allows, <= 4 per
        # thread below 2048 (the backward keeps ~16 such tiles live)
        BB = pow2_block(B, 1, max(1, min(16, 1024 // BH)))
        nw = 4 if BB * BH <= 512 else (8 if BB * BH <= 2048 else 32)
        return step_override(BB, BH, 16, nw)
    if not fused:
        return step_override(pow2_block(B, 1, 16), BH, 16, 4)
    e = dtype.itemsize  # W_hh, h (lstm_hs_dtype) and dG (grad_dtype) all in the operand dtype
    BB, BH, nw = step_tile(B, H, K, 4, e, e, n_sm)
    return step_override(BB, BH, pow2_block(K, 16, 32 if direction == "fwd" else 64), nw)


def rnn_blocks(B: int, H: int, direction: str, fused: bool, dtype: torch.dtype, n_sm: int = DEFAULT_SM_COUNT):
    """The RNN step kernels' tile: BLOCK_K 64 (fp64: 8); fused and not fp64, step_tile's;
    else 16 x 32 (unfused: up to 16 rows), 4 warps."""
    BK = 8 if dtype == torch.float64 else pow2_block(H, 16, 64)
    if not fused or dtype == torch.float64:
        return step_override(16 if fused else pow2_block(B, 1, 16), pow2_block(H, 16, 32), BK, 4)
    # W_hh in the operand dtype; the forward's operand h_{t-1} is the state-dtype hs (its
    # backward needs the precision), the backward's dP_{t+1} the operand dtype
    row_elt = config.state_dtype(dtype).itemsize if direction == "fwd" else config.grad_dtype(dtype).itemsize
    BB, BH, nw = step_tile(B, H, H, 1, dtype.itemsize, row_elt, n_sm)
    return step_override(BB, BH, BK, nw)
