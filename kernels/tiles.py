"""Every tile and plan rule, in one place: the step kernels' (BLOCK_B, BLOCK_H, BLOCK_K,
num_warps) for each launch of kernels/lstm.py, lstm_proj.py, rnn.py and gru.py, and the persistent
kernels' plans (plan, plan_ln: grid, blocks, resident / chunked / streamed W_hh, variants).

The rules keep every step kernel free of register spills at sm_90 (tests/test_sm90_compile.py
checks it; the registers behind each choice are in docs/step-kernels.md). The fused plain LSTM
and RNN take the 16- or 64-row, 16- or 32-unit tile with the least estimated step time
(step_tile: a bandwidth and dot-rate model of an H100, not a timing). ``options().step_tiles``
(tests, bench/persistent_tune.py --step) replaces whatever fields it names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

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



def gru_blocks(B: int, H: int, direction: str, dtype: torch.dtype, n_sm: int = DEFAULT_SM_COUNT):
    """The GRU step kernels' tile ("fwd": the recurrent matmul's K is H; "bwd": the carried
    gradient's K is 3H): step_tile's over the three gates, BLOCK_K 32 (the 16-bit backward at
    BLOCK_K 64 spilled at sm_90 where B is not a multiple of 16), 16 for the fp32 forward's
    16 x 32 tile (it spilled at 32); fp64 16 x 32 with BLOCK_K 8, 4 warps (as the RNN's)."""
    K = H if direction == "fwd" else 3 * H
    if dtype == torch.float64:
        return step_override(16, pow2_block(H, 16, 32), 8, 4)
    # W_hh in the operand dtype; the forward's operand h_{t-1} is the state-dtype hs, the
    # backward's dhp_{t+1} the grad dtype
    row_elt = config.state_dtype(dtype).itemsize if direction == "fwd" else config.grad_dtype(dtype).itemsize
    BB, BH, nw = step_tile(B, H, K, 3, dtype.itemsize, row_elt, n_sm)
    small_k = dtype == torch.float32 and direction == "fwd" and (BB, BH) == (16, 32)
    return step_override(BB, BH, pow2_block(K, 16, 16 if small_k else 32), nw)


# ----------------------------------------------------------------------------------------------
# Persistent plans (kernels/persistent.py and the per-cell persistent kernels)
# ----------------------------------------------------------------------------------------------

# Rows per row block: BLOCK_B = next_pow2(B) in [16, MAX_B]; larger batches take several row blocks.
MAX_B = 64
# Hidden units per program, smallest first: the most programs (SMs) whose grid fits; tl.dot needs >= 16.
BLOCK_H_CHOICES = (16, 32, 64)
# A W_hh slice (all gates) kept on chip (shared memory) up to this size; above it, streamed from L2.
W_RESIDENT_MAX_BYTES = 64 * 1024
# The resident path's whole-row tiles [BLOCK_B, K_pad] a step (4 for the LSTM backward): more spilled.
ROW_TILE_MAX_ELEMS = 32 * 1024
# ... and K_pad = next_pow2(H) at most this (H=768 pads to 1024 and spilled); past it: chunks.
RESIDENT_MAX_K = 512
# Solo plans (Options.solo): all of W_hh in one program per row block, where it fits this.
SOLO_MAX_W_BYTES = 128 * 1024
# Chunk-resident W_hh (Options.w_chunked): CHUNK_K-row tiles per gate within these limits (else spills).
CHUNK_K = 64
CHUNKED_W_MAX_BYTES = 96 * 1024
CHUNKED_ROW_MAX_ELEMS = 48 * 1024


# The layer-norm forward's 2-barrier variant (MERGE_C) where BLOCK_B x K_pad <= this (spills past it).
MERGE_C_MAX_ROW_ELEMS = 4096
# The LN combine's [BLOCK_P, BLOCK_B] tile of partials at most this big (BLOCK_P = next_pow2(P)).
PART_TILE_MAX_ELEMS = 2048


@dataclass(frozen=True)
class Plan:
    """Block sizes and grid of one persistent launch."""

    programs: int
    BLOCK_B: int
    BLOCK_H: int
    BLOCK_K: int
    resident: bool
    num_warps: int
    # pipelining only inside the streamed K loop (3), so no row load of step t+1 moves above step
    # t's barrier; the resident path has no inner loop (1)
    num_stages: int = 3
    row_blocks: int = 1  # R: the grid is (programs, row_blocks)
    ll: bool = False  # exchange rows through the tagged ring (ll_put / ll_get), no barrier
    solo: bool = False  # one program per row block, all of W_hh resident, the row kept in registers
    # resident plans: the slice as w_chunks tiles of BLOCK_K per gate (1: one [K_pad, BLOCK_H]
    # tile; more: Options.w_chunked, the rows then read chunk by chunk like the streamed path's)
    w_chunks: int = 1
    # barrier plans: arrive right after the stores the other programs read, wait after the rest
    # of the step's memory traffic (Options.early_arrive)
    early: bool = True

    @property
    def total(self) -> int:
        return self.programs * self.row_blocks


def max_programs(device) -> int:
    """How many programs may run at once with one program per SM: the SM count on CUDA; 1 on the
    CPU, where the Triton interpreter runs a grid's programs one after another."""
    device = torch.device(device)
    return sm_count(device) if device.type == "cuda" else 1


def grid_fits(programs: int, limit: int) -> bool:
    """The deadlock guard: every program resident at once, one per SM."""
    return 1 <= programs <= limit


def plan(cell: str, direction: str, B: int, H: int, dtype: torch.dtype, device,
         limit: Optional[int] = None, allow_tf32: bool = False, variants: bool = True,
         chunks: bool = True, ln: bool = False) -> Tuple[Optional[Plan], str]:
    """(Plan, "") for a persistent launch of ``cell`` ("lstm" or "rnn") in ``direction``
    ("fwd" or "bwd"), or (None, why not). ``limit``: the most co-resident programs (default
    max_programs(device); tests pass a fake SM count). ``allow_tf32``: fp32 dots on tensor
    cores (otherwise fp32 tl.dot with input_precision="ieee" is lowered to FMAs on sm_90).
    ``variants=False``: never the LL exchange or a solo plan. ``chunks=False``: never a w_chunks
    plan (the LN forward's forced MERGE_C variant needs whole tiles). ``ln``: the plan is for the
    LN kernels: never a solo plan (they have none; they do take LL and w_chunks plans), and their
    backward keeps whole tiles above 16 rows (_ln_num_warps)."""
    device = torch.device(device)
    if limit is None:
        limit = max_programs(device)
    gates = 4 if cell == "lstm" else 1
    cpu = device.type != "cuda"
    fp64 = dtype == torch.float64
    esize = torch.empty((), dtype=dtype).element_size()
    BB = pow2_block(B, 16, MAX_B)
    R = triton.cdiv(B, BB)
    K_pad = pow2_block(H, 16, max(16, triton.next_power_of_2(H)))
    opts = config.options()
    solo = opts.solo
    solo = bool(solo) and variants and not ln and (
        cpu or (dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and allow_tf32))
        and gates * K_pad * K_pad * esize <= SOLO_MAX_W_BYTES and gates * BB * K_pad <= 8192)
    if cpu or solo:
        BH = K_pad  # one program covering every hidden unit: the interpreter's only safe grid
    else:
        choices = (opts.plan_block_h,) if opts.plan_block_h is not None else BLOCK_H_CHOICES
        BH = next((b for b in choices if grid_fits(R * triton.cdiv(H, b), limit)), None)
        if BH is None:
            return None, (f"batch {B} x hidden size {H} needs more than {limit} programs even at "
                          f"BLOCK_H={choices[-1]} ({R} row blocks)")
    programs = triton.cdiv(H, BH)
    # on the CPU only the programs of one row block wait for each other (the interpreter runs the
    # blocks one after another); on a GPU every program of the grid must be resident at once
    if not grid_fits(programs if cpu else R * programs, limit):
        return None, f"{R} x {programs} programs > {limit} co-resident"
    w_bytes = gates * K_pad * BH * esize
    row_elems = (gates if direction == "bwd" else 1) * BB * K_pad
    # tensor-core dots only on GPU (fp32 IEEE and fp64 become FMA loops there); the interpreter
    # takes the resident path whenever the sizes allow, so CI runs it
    mma = dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and (allow_tf32 or cpu))
    resident = (mma and (w_bytes <= W_RESIDENT_MAX_BYTES or solo) and row_elems <= ROW_TILE_MAX_ELEMS
                and (cpu or K_pad <= RESIDENT_MAX_K))
    # whole tiles that spilled in the sm_90 compiles take chunks / the streamed path instead
    bwd_streamed = cell == "lstm" and direction == "bwd" and BB > 16 and row_elems > 8 * 1024 and not ln
    if resident and not cpu and not solo and (bwd_streamed or (direction == "fwd" and K_pad >= 512 and BB < 64)):
        resident = False
    solo = solo and resident  # (on a GPU the limits above imply it; the interpreter's fp64 is not)
    ll = opts.ll_sync
    ll = bool(ll) and variants and not fp64 and not solo
    word_bytes = 8 if esize == 4 else 4  # an LL word (see below)
    nk = triton.cdiv(H, CHUNK_K)
    chunk_rows = (gates if direction == "bwd" else 1) * BB * nk * CHUNK_K  # row elements a step
    chunked = opts.w_chunked
    # (the limits: chunk tiles and the LL row's words that spilled; docs/persistent.md)
    chunked = (bool(chunked) and chunks and not cpu and not resident and mma and BB * CHUNK_K <= 2048
               and not bwd_streamed
               and gates * nk * CHUNK_K * BH * esize <= CHUNKED_W_MAX_BYTES and chunk_rows <= CHUNKED_ROW_MAX_ELEMS
               and (not ll or chunk_rows * word_bytes <= 64 * 1024))
    if chunked:
        resident, BK = True, CHUNK_K
    elif resident:
        BK = K_pad
    elif fp64:
        BK = 8  # the FMA product [BLOCK_B, BLOCK_K, BLOCK_H]
    else:
        K = gates * H if direction == "bwd" else H
        # streamed mma chunks: 64, or 32 for a 64 x 32 tile (S3: BK=64 spilled)
        BK = pow2_block(K, 16, (32 if BB * BH >= 2048 else 64) if mma else 32)
    # 4 warps spilled at B=64 and at H=768, 8 did not
    num_warps = 4 if BB * K_pad <= 4096 and w_bytes <= 16 * 1024 else 8
    # LL words take twice the registers of the row tile they replace: only where the tile's words
    # fit 16 KiB or are streamed, and under 2048 elements a program (larger spilled); fp64 never
    ll = ll and (
        cpu or (BB * BH < 2048 and (not resident or chunked or BB * K_pad * word_bytes <= 16 * 1024)))
    if ll or (solo and not cpu):
        num_warps = 8
    if not cpu and opts.plan_num_warps is not None:
        num_warps = opts.plan_num_warps
    early = bool(opts.early_arrive) and not (ll or solo)
    # (not the LSTM backward's 64 x 32 tiles at S3: they spilled in the early order)
    early = early and not (cell == "lstm" and direction == "bwd" and BB * BH >= 2048)
    return Plan(programs, BB, BH, BK, resident, num_warps, 1 if resident else 3, R, ll, solo,
                nk if chunked else 1, early), ""


def block_p(programs: int) -> int:
    return triton.next_power_of_2(max(int(programs), 1))


def plan_ln(direction: str, B: int, H: int, dtype: torch.dtype, device, limit: Optional[int] = None,
            allow_tf32: bool = False) -> Tuple[Optional[Plan], str]:
    """(Plan, "") for a persistent layer-norm LSTM launch in ``direction`` ("fwd" / "bwd"), or
    (None, why not). plan()'s rules (one program per SM at most, the deadlock guard;
    one program per row block covering all of H on the CPU; resident or streamed W_hh; the LL
    exchange where it takes it and, on a GPU, ln_ll_fits agrees; never a solo plan), with the
    programs of a row block also capped at PART_TILE_MAX_ELEMS / BLOCK_B (the combine's tile).
    num_warps: see _ln_num_warps."""
    device = torch.device(device)
    if limit is None:
        limit = max_programs(device)
    BB = max(16, min(MAX_B, triton.next_power_of_2(max(int(B), 1))))
    R = triton.cdiv(B, BB)
    cap = max(1, PART_TILE_MAX_ELEMS // BB)
    lim = limit if device.type != "cuda" else min(limit, R * cap)
    # W_hh in chunks where the plain plan takes them, in the forward only (the backward spilled
    # with them), and not for a MERGE_C forward (its resident operand is a whole c row tile)
    forced = config.options().merge_c
    merge = forced if forced is not None else BB * k_pad(H) <= MERGE_C_MAX_ROW_ELEMS
    pl, why = plan("lstm", direction, B, H, dtype, device, lim, allow_tf32, variants=True,
                          chunks=direction == "fwd" and not merge, ln=True)
    if pl is not None and pl.ll and device.type == "cuda" and not ln_ll_fits(direction, pl, dtype):  # the barrier's
        pl, why = plan("lstm", direction, B, H, dtype, device, lim, allow_tf32, variants=False,
                              chunks=direction == "fwd" and not merge, ln=True)
    if pl is None:
        if lim < limit:
            why += f" (layer-norm LSTM: at most {cap} programs per row block of {BB} rows)"
        return None, why
    assert pl.BLOCK_B == BB and block_p(pl.programs) * pl.BLOCK_B <= max(PART_TILE_MAX_ELEMS, pl.BLOCK_B)
    return replace(pl, num_warps=_ln_num_warps(direction, pl, H)), ""


def ln_ll_fits(direction: str, pl: Plan, dtype: torch.dtype) -> bool:
    """Whether the LN kernels on a GPU take the LL exchange that plan() chose (Options.ll_sync):
    16-bit dtypes, BLOCK_B = 16, the forward only with its W_hh slice whole on chip; elsewhere
    the barrier plan (the LL words spilled there in the sm_90 compiles; docs/persistent.md)."""
    if dtype not in (torch.float16, torch.bfloat16) or pl.BLOCK_B > 16:
        return False
    return direction == "bwd" or (pl.resident and pl.w_chunks == 1)


def _ln_num_warps(direction: str, pl: Plan, H: int) -> int:
    """num_warps of the LN kernels: the plain plan's, except 4 for the resident backward with a
    row tile BLOCK_B x K_pad <= 4096 at BLOCK_B = 16 (8 at more rows), and 8 for the forward's
    MERGE_C variant (fwd_merge_c): the counts that did not spill in the sm_90 compiles of these
    kernels (docs/persistent.md has them)."""
    if pl.ll:
        return pl.num_warps
    if direction == "bwd" and pl.resident and pl.w_chunks == 1 and pl.BLOCK_B * pl.BLOCK_K <= 4096:
        return 4 if pl.BLOCK_B <= 16 else 8
    if direction == "fwd" and fwd_merge_c(pl, H):
        return 8
    return pl.num_warps


def k_pad(H: int) -> int:
    """The padded row width of the whole-row tiles (the resident W_hh tile's K)."""
    return max(16, triton.next_power_of_2(int(H)))


def fwd_merge_c(pl: Plan, H: int) -> bool:
    """Whether the forward runs the 2-barrier variant (MERGE_C): never with the LL exchange (no
    barrier to save), else Options.merge_c if set, else the row tile rule BLOCK_B x K_pad <=
    MERGE_C_MAX_ROW_ELEMS (see there)."""
    if pl.ll:
        return False
    forced = config.options().merge_c
    if forced is not None:
        return bool(forced)
    return pl.BLOCK_B * k_pad(H) <= MERGE_C_MAX_ROW_ELEMS
