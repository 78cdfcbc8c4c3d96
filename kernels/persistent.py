"""The shared machinery of the persistent kernels, which run all T steps of one layer in one launch,
forward and backward: the plans (plan, plan_ln), the grid barrier, the LL exchange, the resident
W_hh tiles and the launch helpers. The kernels: kernels/lstm_persistent.py (plain LSTM),
kernels/rnn_persistent.py (tanh/ReLU RNN), kernels/ln_lstm_persistent.py (layer-norm LSTM: its
LayerNorms need statistics over whole rows, and a program owns only a slice of the hidden units,
so those kernels add cross-program reductions, more barriers per step, to this design).

Legend
    T   time steps                 B   batch rows (row blocks of BLOCK_B <= MAX_B rows)
    H   hidden units               G   = 4H gate pre-activations (LSTM; gate order i, f, g, o)
    P   programs in the grid       K   reduction dim of the recurrent matmul
Layouts are the step path's (kernels/lstm.py, kernels/rnn.py): the launchers there allocate the
buffers, and call into here instead of their per-step loop, so the saved tensors (hs, cs
[T+1, B, H], gates [T, B, G], dG / dP [T+1, B, *]) and the outputs are exactly what the step
path writes, and a persistent forward pairs with either backward.

Design
    grid = (P, R): program (p, r) owns hidden units j in [p BLOCK_H, (p+1) BLOCK_H), all four
    gates (LSTM), for the batch rows of row block r (BLOCK_B rows; R = cdiv(B, BLOCK_B), 1 up to
    B = 64). Per step it needs the full previous row of its rows (forward: h_{t-1} [BLOCK_B, H];
    backward: dG_{t+1} [BLOCK_B, G]), read from global memory, times its slice of W_hh. Rows
    never mix, so the P programs of one row block meet at their own barrier (one counter per row
    block) after each step, and row blocks run independently. What only the program itself
    writes stays in registers across steps:
    c and its own h columns (forward), the carried gradients gh, gc (backward).
    W_hh slice, RESIDENT=True: loaded once, before the time loop, as one [K_pad, BLOCK_H] tile
    per gate (forward: W_q[j, k]; backward: W_q[k, j], K_pad = next_pow2(H)), so one tl.dot per
    gate and step; or, past the whole tile's limits, as NK = Plan.w_chunks tiles of BLOCK_K rows
    per gate (a tuple, unrolled at compile time: Options.w_chunked), the row then read chunk by chunk.
    Triton keeps these tiles in shared memory (in the TTGIR of an sm_90 compile the local_allocs
    sit before the time loop; each step local_loads the mma operand). RESIDENT=False:
    BLOCK_K chunks re-read from global memory (L2) every step, the step kernel's loop: fp64 (an
    FMA product [BLOCK_B, BLOCK_K, BLOCK_H]), fp32 without TF32 on a GPU (tl.dot lowers to FMAs),
    and slices or row tiles over the limits below.
    Overlap: the next step's tiles that no other program writes (forward: x W_ihᵀ + b; backward:
    the saved gates, dout and c) are loaded before the barrier's wait (ANCHORS: 3.4 -> 2.55 ms at
    S1 for a prototype persistent forward, loading them before the barrier), and after its
    arrival, together with the stores no other program reads (Options.early_arrive: the arrival's release
    then waits for the row the others need only).

Grid barrier (grid_barrier): a per-launch int32 counter per row block, zeroed by the launcher,
never reused. Barrier number n (n = 1, 2, ...) waits for the counter to reach n P: a CTA barrier (every thread
of the program has stored its part of the step), one atomic add with release semantics at GPU
scope (Triton issues a scalar atomic from one thread), then a spin on an acquire read of the
counter, then a CTA barrier again so that no thread reads the next step's row before the acquire.
ANCHORS measured this pattern at 0.64 us a step with 1 program, 0.99 us with 128.
Triton 3.9 (installed here) compiles it for sm_90 to bar.sync; red.global.gpu.release.add.u32;
a loop of {ld.global.gpu.acquire.b32 by thread 0, broadcast through shared memory, bar.sync};
bar.sync (read from the PTX on this CPU machine; tests/test_persistent.py checks it, and that
there is one release add per barrier, issued by thread 0 only: the n P target counts programs).
What makes the other programs' rows visible after a barrier is that acquire: in the SASS it is
an LDG.E.STRONG.GPU followed by CCTL.IVALL, an invalidation of the SM's whole L1 (what
cooperative groups' grid.sync() relies on), then BAR.SYNC. The ".cg" hint on the row loads is
not what guarantees it: with num_stages > 1 Triton's pipeliner turns those loads into
cp.async, and copies narrower than 16 bytes become cp.async.ca (through L1), e.g. at B16 H768
(a review of sm_90 compiles, 2026-11-27). The sem=
and scope= arguments of tl.atomic_add: triton-lang/triton PR #2562 added scope, and PR #5580
(January 2025) describes both as existing attributes of every atomic, so Triton 3.6 has them.
NONE OF THIS HAS RUN ON A GPU YET.

LL exchange (Options.ll_sync / Plan.ll, plain LSTM and RNN; the layer-norm LSTM's kernels too, see
kernels/ln_lstm_persistent.py): instead of the barrier, each element of the
row the others need goes out with its step number in one word, and readers spin on those words
(ll_put / ll_get: why it is correct, and what it should save). Its programs wait for each other
just the same, so the deadlock guard below applies unchanged. UNMEASURED; off by default.
Solo plans (Options.solo / Plan.solo): one program per row block owning every hidden unit, where all of
W_hh fits on chip (SOLO_MAX_W_BYTES): nothing to exchange or wait for, the row a step produces
is the next step's operand straight from registers. UNMEASURED; off by default.

Deadlock guard: every program must be resident at once, or the ones spinning wait forever for
ones that cannot start. plan() allows at most one program per SM (P R <= multi_processor_count),
so residency needs only that one CTA fits on an SM, which any kernel that launches at all does,
once the SMs are free of other work. On CUDA the kernel is also launched cooperatively
(launch_cooperative_grid=True: Triton PR #5381, merged December 2024; present in the installed
3.9, assumed in 3.6 from the date): the driver then refuses a grid that cannot be co-resident with
an error instead of a hang (not while a CUDA graph is captured; see launch_opts). Left unguarded:
two persistent launches on two streams at once could each hold part of the SMs and wait for
each other, and an MPS client limited to fewer SMs than the device reports.
Under the Triton interpreter the programs of a grid run one after another, so only P = 1 can pass
a barrier: plan() gives CPU tensors one program per row block covering all of H (how CI tests
these kernels, row blocks included: a row block's lone program runs all its steps, then the next
block's); the multi-program path is tested by CUDA-only tests.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import config
from ._common import pow2_block, sm_count

# ---- limits and tuning knobs (UNMEASURED: no GPU this session; see each comment) ------------
# Rows per row block: BLOCK_B = next_pow2(B) in [16, MAX_B]; larger batches take cdiv(B, 64) row
# blocks, each with its own P programs and barrier (S3, B256 H1024: 4 row blocks x 32 programs of
# BLOCK_H = 32 = 128 programs). UNMEASURED against the step path at large B.
MAX_B = 64
# Hidden units per program, tried in this order: the smallest block whose grid fits on the SMs
# (most programs: the most SMs streaming W_hh and h; ANCHORS' barrier cost grows only from
# 0.64 to 0.99 us between 1 and 128 programs). tl.dot needs >= 16.
BLOCK_H_CHOICES = (16, 32, 64)
# A W_hh slice (all gates) held on chip for the whole sequence up to this size; above it,
# streamed from L2 each step. 64 KiB = bf16 H=512 at BLOCK_H=16 (S2). Triton 3.9 keeps the
# resident tiles in shared memory (local_alloc hoisted out of the time loop; a local_load into the
# mma operand layout each step), checked in the TTGIR of an sm_90 compile on this machine.
W_RESIDENT_MAX_BYTES = 64 * 1024
# The resident path also loads whole rows [BLOCK_B, K_pad] each step (the LSTM backward: four,
# one per gate block). sm_90 compiles with ptxas (Triton 3.9, no GPU; registers / stack bytes):
#   LSTM fwd  B16 H256 bf16  1 x 16x256   188 regs, no spill;   B64 H512: 1 x 64x512  213, none
#   LSTM bwd  B16 H256 bf16  4 x 16x256   187 regs, no spill;   B64 H256: 4 x 64x256  255 + 808 B
# so at most 32K row elements a step.
ROW_TILE_MAX_ELEMS = 32 * 1024
# ... and K_pad = next_pow2(H) at most 512: at H=768 (S4) the resident tile pads K to 1024 (a third
# more work) and the RNN forward spilled (255 regs + 208 B stack at 8 warps); streaming in
# BLOCK_K=64 chunks compiled without spills (253 regs at 8 warps). (Past these two limits W_hh
# can still stay on chip, in chunks: Options.w_chunked, below.)
RESIDENT_MAX_K = 512
# The variant switches plan() reads are kernels.config.Options' fields (config.using sets them):
# plan_block_h / plan_num_warps force plan()'s choices on CUDA (bench/persistent_tune.py's grid).
# ll_sync: flag-in-data exchange ("LL", see ll_put) instead of the grid barrier, for the plain
# LSTM, the RNN and the layer-norm LSTM (where ln_ll_fits; its LayerNorm partials too), forward
# and backward. UNMEASURED (no GPU yet): off by default; a variant of bench/persistent_tune.py,
# which times it against the barrier.
# One program per row block holding ALL of W_hh on chip ("solo"): no other program to wait for,
# so no barrier and no exchange; the row a step produces stays in registers as the next step's
# matmul operand (never re-read from memory). Only where the whole W_hh fits the shared memory
# next to the rest: SOLO_MAX_W_BYTES (the tanh RNN at H=256 in bf16: 128 KiB; the LSTM at
# H <= 128). sm_90 compile of the RNN forward at B16 H256 bf16 (Triton 3.9): 8 warps 255 registers
# + 100 B spilled (the spills sit in the prologue's W load, 5 reloads inside the time loop),
# 144 KiB shared; 4 warps spilled 1544 B. One SM then does the whole step (a [16, 256] x [256, 256]
# product a step for the RNN at S1) instead of 16 SMs plus a barrier. The gate tiles (gates x
# BLOCK_B x K_pad fp32 accumulators) are bounded at 8192 elements: the LSTM at B16 H128 (8192)
# spilled 92 B, at B64 H64 (16384) 896 B. UNMEASURED: off by default (Options.solo); a variant
# of bench/persistent_tune.py.
SOLO_MAX_W_BYTES = 128 * 1024
# W_hh slices over the whole-tile limits (K_pad > RESIDENT_MAX_K, or the row tile over
# ROW_TILE_MAX_ELEMS) kept on chip anyway, as ceil(H / CHUNK_K) tiles of CHUNK_K rows per gate,
# each step's row read chunk by chunk from L2 as on the streamed path ("w_chunks" plans). At S4
# (B16 H768, 48 programs of BLOCK_H = 16) the streamed path re-reads each program's 96 KiB of
# W_hh from L2 every step, next to 24 KiB (forward) or 96 KiB (backward) of rows; this keeps the
# 96 KiB in shared memory. sm_90 compiles at S4 (bf16, 8 warps, lengths; registers, Triton 3.9 /
# 3.6, against the streamed plan's; no spill anywhere): LSTM fwd 144 / 160 (streamed 174 / 180),
# bwd 255 / 245 (123 / 116), RNN fwd 80 / 128 (125 / 126), bwd 99 / 128 (64 / 64); 98 KiB of
# shared memory for the LSTM, 26-28 KiB for the RNN. Where the row elements a step exceed
# CHUNKED_ROW_MAX_ELEMS the compiler hoists the chunk loads (all issued up front) and runs out of
# registers: a B64 H512 backward (128K elements) took 255 registers and spilled ~1 KB under
# Triton 3.6, a B128 H1024 forward (128K) 168-1608 B. UNMEASURED on a GPU; on by default inside
# the persistent path (itself opt-in; Options.w_chunked); w_chunked=False is the tuner's variant
# with W_hh streamed.
CHUNK_K = 64
CHUNKED_W_MAX_BYTES = 96 * 1024
CHUNKED_ROW_MAX_ELEMS = 48 * 1024
# The grid barrier split in two (plain LSTM and RNN): arrive (CTA barrier, release add) right after
# the stores the other programs read at the next step (h_t; dG_t / dP_t), then this step's other
# memory traffic (the stores only the backward or the caller reads: gates, c, the RNN's output;
# the loads of the next step's own tiles), then wait. With everything before one grid_barrier,
# as before, the release (MEMBAR.ALL.GPU before the REDG in the sm_90 SASS, Triton 3.9) waits for
# all of it, the next step's loads included (x W_ih at S1: 32 MiB for the LSTM, partly out of
# L2); now it waits for the h_t stores only, and the loads land during the wait. UNMEASURED; on
# by default inside the persistent path (itself opt-in): the same operations, the release waiting
# on fewer (Options.early_arrive); early_arrive=False is the tuner's variant with the former order.
# (Options.cooperative_launch: the cooperative launch on CUDA, see the module docstring; a switch
# so that a GPU session can turn it off if the installed Triton rejects the option.)

# What the last launch of each kernel compiled to (GPU only: n_regs, n_spills, shared bytes),
# for the benchmark and the GPU session; empty under the interpreter.
LAST_LAUNCH: dict = {}

# The forward's 2-barrier variant (MERGE_C) where BLOCK_B x K_pad <= this (K_pad = next_pow2(H)):
# every program then holds whole c_t / o_t row tiles [BLOCK_B, K_pad] of its row block.
# Chosen from sm_90 compiles (see _ln_num_warps). UNMEASURED on a GPU.
MERGE_C_MAX_ROW_ELEMS = 4096
# (Options.merge_c forces the choice: True / False; None = this rule.)
# The combine loads every program's partials of one quantity as a [BLOCK_P, BLOCK_B] tile,
# BLOCK_P = next_pow2(P): at most this many elements (B = 64: P <= 32; B = 16: P <= 128), so
# plan_ln takes a larger BLOCK_H where the smallest would give more programs. (UNMEASURED.)
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
    # Software pipelining only inside the streamed K loop (num_stages=3, Triton's default), so the
    # row loads of step t+1 can never be hoisted above step t's barrier; the resident path has no
    # inner loop and gets num_stages=1. (Triton 3.9 pipelines only the inner loop: in the sm_90
    # TTGIR its async copies sit after the barrier of the previous step.)
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
    solo = bool(solo) and variants and not ln and (cpu or (dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and allow_tf32))
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
    # Whole tiles that spilled in a sweep of the default plans (sm_90, bf16, Triton 3.6 / 3.9; not
    # the benchmark shapes): the forward at K_pad 512 under 64 rows (B16 H512 LSTM 56 / 136 B, RNN
    # 64 / 112 B; B32 H512 64-80 B; chunks of 64 rows: 107-169 registers, none); the LSTM backward
    # above 16 rows with row tiles over 8K elements (B32 H128 520 / 480 B at 4 warps, B64 H64
    # 608 / 656 B, B64 H128 128 / 136 B, B32 H256 120 / 232 B; streamed: B32 H128 0 / 24 B,
    # B64 H64 96 / 48 B, B64 H128 0 / 0, B32 H256 8 / 8 B). Those take chunks / the streamed path.
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
    # (with the LL exchange the row's words: the S4 LSTM backward's 48K words spilled 1160 B under
    # Triton 3.6 (none under 3.9), its forward's and the RNN's 12K did not: LL keeps the streamed
    # W_hh there rather than give up either)
    # (BB x CHUNK_K <= 2048: the LSTM forward at B64 H768, 12 chunks of [64, 64], spilled
    # 2424 B under Triton 3.6 and 976 B under 3.9; streamed 207 / 182 registers, none)
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
        # streamed mma chunks: 64, or 32 for a 64 x 32 tile (S3's plan, B256 H1024 bf16, 8 warps,
        # ptxas 13.4 for sm_90: LSTM fwd BK=64 255 regs + 20 B spilled, BK=32 252 regs, none;
        # LSTM bwd 255 regs + 32 B spilled at BK=64, + 16 B at BK=32, + 24-32 B at 16 warps; since
        # the saved c is 16-bit, BK=32: 252 regs, none; Triton 3.6: 254 + 16 B)
        BK = pow2_block(K, 16, (32 if BB * BH >= 2048 else 64) if mma else 32)
    # 4 warps spilled at B=64 and at H=768 (255 regs + 360-528 B stack); 8 did not (sm_90 compiles)
    num_warps = 4 if BB * K_pad <= 4096 and w_bytes <= 16 * 1024 else 8
    # The LL exchange waits on 32-bit words (16-bit values): twice the registers of the row tile
    # it replaces. sm_90 compiles (Triton 3.9, bf16, lengths; registers + spilled bytes, LL vs
    # barrier): S1 LSTM fwd 208 / 210, bwd 191 / 206, none; S4 (streamed) LSTM 171 / 174 and
    # 102 / 123, none; but a resident [64, 512] tile (S2) spilled 262-386 B, and S3's 64 x 32
    # tiles 24 B (LSTM bwd). So only where the row tile's words take at most 16 KiB (16 x 256
    # 32-bit words; fp32's 64-bit words: 16 x 128, the RNN in fp32 with TF32 at B16 H256 spilled
    # 24-36 B) or are streamed, and the tile per program under 2048; fp64 never (a tagged word
    # would take 128 bits). The RNN at S1 spilled 8-16 B at 4 warps, none at 8. (No such limit in
    # the interpreter.)
    ll = ll and (
        cpu or (BB * BH < 2048 and (not resident or chunked or BB * K_pad * word_bytes <= 16 * 1024)))
    if ll or (solo and not cpu):
        num_warps = 8
    if not cpu and opts.plan_num_warps is not None:
        num_warps = opts.plan_num_warps
    early = bool(opts.early_arrive) and not (ll or solo)
    # (not the LSTM backward's 64 x 32 tiles at S3: 252 registers without a spill in the former
    # order, 16 B (Triton 3.9) / 32 B (3.6) spilled in this one; the forward there went from 254
    # to 190 registers)
    early = early and not (cell == "lstm" and direction == "bwd" and BB * BH >= 2048)
    return Plan(programs, BB, BH, BK, resident, num_warps, 1 if resident else 3, R, ll, solo,
                nk if chunked else 1, early), ""




def block_p(programs: int) -> int:
    return triton.next_power_of_2(max(int(programs), 1))



def plan_ln(direction: str, B: int, H: int, dtype: torch.dtype, device, limit: Optional[int] = None,
            allow_tf32: bool = False) -> Tuple[Optional[Plan], str]:
    """(Plan, "") for a persistent layer-norm LSTM launch in ``direction`` ("fwd" / "bwd"), or
    (None, why not). persistent.plan's rules (one program per SM at most, the deadlock guard;
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
    # W_hh in chunks (Options.w_chunked) where the plain plan takes them, in the forward only:
    # sm_90 compiles at B16 H768 (bf16, lengths; Triton 3.9): forward 184-188 registers, no stack
    # (streamed: 220-228); backward 255 + 40-56 B of stack at 8 warps (streamed: 179-231, none).
    # Not for a MERGE_C forward either: its resident operand is a whole c row tile (with the
    # limits as set, fwd_merge_c's rule and a chunked plan never meet; Options.merge_c can).
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
    """Whether the LN kernels on a GPU take the LL exchange that persistent.plan() chose
    (Options.ll_sync): fp16 / bf16 only (32-bit words for the row; fp32 with TF32, 64-bit words, spilled
    8 B in the S4 backward), at BLOCK_B = 16 only, the forward only with its W_hh slice whole on
    chip (resident, one tile). sm_90 compiles with LL (bf16, lengths, 8 warps; registers + stack
    bytes, Triton 3.9 / 3.6):
        fwd B16 H256 resident   183 / 207, none       bwd B16 H256 resident   174 / 186, none
        fwd B16 H128 resident   218 / 237, none       bwd B16 H128 resident   240 / 248, none
        fwd B16 H768 chunked    236 + 24 B / -        bwd B16 H768 streamed   172 / 227, none
            (4 warps: 252 + 8 B; streamed: 249 + 24 B)   bwd B16 H1024 streamed  172 / 227, none
        fwd B16 H1024 streamed  249 + 24 B / -
        fwd B64 H64 resident    171 / 231, none       bwd B64 H64 resident    252 / 255 + 40 B
                                                      bwd B64 H512 streamed   254 + 8 B / -
    (the row's tagged words and the LayerNorm partials' 64-bit words, BLOCK_P x BLOCK_B per
    quantity, on top of the barrier kernels' registers). Elsewhere the barrier plan."""
    if dtype not in (torch.float16, torch.bfloat16) or pl.BLOCK_B > 16:
        return False
    return direction == "bwd" or (pl.resident and pl.w_chunks == 1)


def _ln_num_warps(direction: str, pl: Plan, H: int) -> int:
    """num_warps of the LN kernels: the plain plan's, except 4 for the resident backward with a
    row tile BLOCK_B x K_pad <= 4096 at BLOCK_B = 16 (8 at more rows: at 4 warps, bf16, Triton
    3.9 / 3.6, B64 H64 spilled 32 / 400 B, B64 H32 0 / 288 B, B32 H128 8 / 0 B, B32 H64 8 / 0 B;
    at 8 warps none), and 8 for the forward's MERGE_C variant (fwd_merge_c).
    Chosen from sm_90 compiles of these kernels (Triton 3.9 +
    its bundled ptxas on a CPU machine, specialised as a GPU launch is: aligned pointers, B and H
    divisible by 16; bf16, lengths on; registers / stack bytes from cuobjdump -res-usage;
    "fp32 | bf16" = the dtype of hs (fwd) / dG (bwd)):
        fwd B16 H256 resident   4 warps: 255+64 B | 255+32 B   8 warps: 173 | 182, no stack
        bwd B16 H256 resident   4 warps: 168 | 168, no stack   8 warps: 128+16 B | 128+32 B
                                (ptxas held itself to 128 registers at 8 warps there)
        fwd B64 H512 resident   4 warps: 255+904 B | +800 B    8 warps: 225, none | 255+8 B
        bwd B64 H512 BK=64      4 warps: 255+192 B | +120 B    8 warps: 241 | 247, no stack
        fwd B16 H768 BK=64      4 warps: 230 | 232, none       8 warps: 238 | 240, none
        bwd B16 H768 BK=64      4 warps: 236 | 227, none       8 warps: 182 | 179, none
    16 warps spilled everywhere (128 registers a thread). Two earlier versions of the kernels
    spilled far more; what fixed them: the partials with compile-time strides (one base address
    per thread), their addresses depending on the step (parity), the LN parameters loaded where
    used, the backward's LN-gradient sums accumulated in memory and its statistics loaded where
    used. The one remaining spill (fwd B64 H512 with a bf16 hs, 8 bytes of stack) went when the
    forward stopped carrying a held h in registers (its hs[t+1] is the output, 0 past the end):
    252 registers, no stack (Triton 3.9). Triton 3.6 (the GPU machine's) still spills 32 bytes
    there; streaming W_hh instead (BLOCK_K = 32: 185 registers, BLOCK_K = 16: 170, no stack,
    Triton 3.9) would re-read the program's 64 KiB W_hh slice from L2 every step, which should
    cost more than a 32-byte spill (not measured; the GPU session should time both).
    The forward's MERGE_C variant (2 barriers a step; same compiles; "-" = not selected there):
        B16 H256 resident       4 warps: 255+40 B | 255+48 B   8 warps: 225 | 217, no stack
        B16 H128 resident       4 warps: 255+24 B | 255+16 B   8 warps: 195 | 192, no stack
        B64 H64  resident       4 warps: 255+48 B | 232, none  8 warps: 241 | 216, no stack
        B16 H64  resident                                      8 warps: 220 | 220, no stack
        B32 H128 resident       4 warps: 255+72 B | 255+64 B   8 warps: 255+24 B | 246, none
        B32 H64  resident                                      8 warps: 255+40 B | 250, none
        fp32 (TF32) B16 H256 resident, hs fp32: 8 warps 255+64 B (3-barrier: 241, none);
        fp32 (IEEE) B16 H256 BK=32, hs fp32:    8 warps 190, none (3-barrier: 166, none)
        - B32 H256 resident    8 warps: 255+40 B | 255+56 B   (3-barrier: 188 | 184, none)
        - B16 H512 resident    8 warps: 255+168 B | 255+80 B  (3-barrier: 255+48 B | 239)
        - B16 H768 BK=64       8 warps: 255+312 B | 255+320 B (3-barrier: 238 | 240, none)
        - B64 H512 resident    8 warps: 255+984 B (bf16 hs)   (3-barrier: 255+8 B)
    hence MERGE_C_MAX_ROW_ELEMS = 4096: every program holds whole [BLOCK_B, K_pad] c, o (and,
    with lengths, held h) row tiles, which spill past that. (At B16 H768 a chunked variant of
    the c statistics, tried and dropped, still spilled 16-24 B at num_stages=3.)
    UNMEASURED on a GPU: registers are not speed."""
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



# ----------------------------------------------------------------------------------------------
# The shared @triton.jit helpers: grid barrier, LL exchange, resident W_hh tiles, row chunks
# ----------------------------------------------------------------------------------------------


@triton.jit
def barrier_arrive(sync_ptr):
    """The first half of grid_barrier: this program's stores so far, then its arrival."""
    tl.debug_barrier()  # every thread's stores of this step precede the release below
    tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")


@triton.jit
def barrier_wait(sync_ptr, target):
    """The second half: wait until the counter at sync_ptr reaches ``target``."""
    while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()  # no thread reads the next step's row before the acquire


@triton.jit
def grid_barrier(sync_ptr, target):
    """Wait until every program has arrived: the counter at sync_ptr reaches ``target``."""
    barrier_arrive(sync_ptr)
    barrier_wait(sync_ptr, target)


@triton.jit
def barrier_finish(sync_ptr, target, EARLY: tl.constexpr):
    """The end of a step's barrier: its wait where the step arrived early (Options.early_arrive: after
    barrier_arrive), else the whole barrier."""
    if EARLY:
        barrier_wait(sync_ptr, target)
    else:
        grid_barrier(sync_ptr, target)


# Flag-in-data exchange (the "LL" protocol of NCCL's low-latency transfers, written anew here):
# instead of storing its rows and meeting the others at grid_barrier, a program stores each
# element of the row tile the others need (h_t forward, dG_t / dP_t backward, already in the dot
# operand's dtype WT) together with its step number in ONE 32-bit word (16-bit WT) or 64-bit word
# (fp32), and a reader spins on plain volatile loads of the words it needs until every one
# carries the step it waits for. A word is written by a single store (a relaxed exchange: see
# ll_put), so a reader that sees the tag sees the value stored with it: no fence, no counter,
# and no second read of the row after a barrier (the barrier costs a release fence, an atomic
# add, an acquire poll and then the row load: ANCHORS 0.84 us a step with 16 programs, the row
# load after it on top).
# Ring of 2 slots [2, B, N]: slot s % 2 holds row slot s (hs slot s forward, dG slot s backward),
# tag s & 0x7FFF. The launcher fills it with -1 (tag 0xFFFF: never a step), each program writes
# its own columns of the first slot before its loop. Reuse is safe with 2 slots: a program
# overwrites slot s % 2 with row s only after it has read every program's row s-1, which each
# program wrote only after all its threads' reads of row s-2 (the same slot) had returned: the
# reads end in the wait loop's CTA-wide reduction, which precedes every store of the step.
# Volatile loads are ld.volatile (strong, not cached in L1), so no stale L1 line is read.
# UNMEASURED: whether it beats the barrier (the reader re-reads a whole tile while waiting,
# twice the bytes of the row itself) is for bench/persistent_tune.py to say.
@triton.jit
def ll_put(ring_ptr, off, v, tag, mask):
    """Publish tile v (16-bit or fp32) at ring_ptr + off, each element with the low 15 bits of
    step ``tag`` above it, one word per element (int32 ring: 16-bit v; int64 ring: fp32 v)."""
    tg = tag & 0x7FFF
    if ring_ptr.dtype.element_ty == tl.int64:
        w = (v.to(tl.uint32, bitcast=True).to(tl.uint64) | (tg.to(tl.uint64) << 32)).to(tl.int64, bitcast=True)
    else:
        w = (v.to(tl.uint16, bitcast=True).to(tl.uint32) | (tg.to(tl.uint32) << 16)).to(tl.int32, bitcast=True)
    # a strong (relaxed, GPU-scope) store, as the PTX memory model wants for a location other
    # programs read concurrently; Triton's tl.store is weak, so an exchange whose result is unused
    tl.atomic_xchg(ring_ptr + off, w, mask=mask, sem="relaxed", scope="gpu")


@triton.jit
def ll_get(ring_ptr, off, mask, tag, WT: tl.constexpr):
    """Wait until every word of the tile ring_ptr + off under mask carries step ``tag``; return
    the tile's values as WT (0 outside mask)."""
    SH: tl.constexpr = 32 if ring_ptr.dtype.element_ty == tl.int64 else 16
    tg = tag & 0x7FFF
    w = tl.load(ring_ptr + off, mask=mask, other=0, volatile=True)
    late = tl.max(tl.max(tl.where(mask & (((w >> SH) & 0xFFFF) != tg), 1, 0), 1), 0)
    while late > 0:
        w = tl.load(ring_ptr + off, mask=mask, other=0, volatile=True)
        late = tl.max(tl.max(tl.where(mask & (((w >> SH) & 0xFFFF) != tg), 1, 0), 1), 0)
    if SH == 32:
        v = (w & 0xFFFFFFFF).to(tl.uint32).to(WT, bitcast=True)
    else:
        v = (w & 0xFFFF).to(tl.uint16).to(WT, bitcast=True)
    return v


@triton.jit
def w_tiles(w_ptr, col_off, k_base, cmask, H, BLOCK_K: tl.constexpr, NK: tl.constexpr, TRANS: tl.constexpr):
    """NK tiles [BLOCK_K, BLOCK_H] of a resident W_hh slice, loaded once, as a tuple; tile kc
    holds, for the k of chunk kc (0 from H on) at [k - kc BLOCK_K, j]: W_hh[k_base + k, col_off[j]]
    (TRANS) or element col_off[j] + k (col_off: the offsets of W_hh rows). NK = 1: one tile of
    BLOCK_K = K_pad; NK > 1: Plan.w_chunks (the tuple is unrolled at compile time; Triton keeps
    every tile in shared memory, see CHUNK_K). (The two address forms, and the mask computed
    before the address, are the whole-tile kernels' own: sm_90 registers depend on them, e.g.
    the solo LSTM backward at B16 H128 spilled 184 B instead of 88 under Triton 3.6 with the
    mask after.)"""
    ws = ()
    for kc in tl.static_range(NK):
        ks = kc * BLOCK_K + tl.arange(0, BLOCK_K)
        wm = (ks < H)[:, None] & cmask[None, :]
        if TRANS:
            p = w_ptr + ((ks + k_base).to(tl.int64) * H)[:, None] + col_off[None, :]
        else:
            p = w_ptr + col_off[None, :] + ks[:, None]
        ws = ws + (tl.load(p, mask=wm, other=0.0),)
    return ws


@triton.jit
def w_tiles_fwd(w_ptr, w_i, w_f, w_g, w_o, cmask, H, BLOCK_K: tl.constexpr, NK: tl.constexpr):
    """The forward's resident W_hh slice, loaded once: for each gate q, NK tiles (w_tiles) of
    W_q[j, k] at [k, j] (w_q: the offsets of the rows (q H + j) H of this program's units j)."""
    return (w_tiles(w_ptr, w_i, 0, cmask, H, BLOCK_K, NK, False),
            w_tiles(w_ptr, w_f, 0, cmask, H, BLOCK_K, NK, False),
            w_tiles(w_ptr, w_g, 0, cmask, H, BLOCK_K, NK, False),
            w_tiles(w_ptr, w_o, 0, cmask, H, BLOCK_K, NK, False))


@triton.jit
def w_tiles_bwd(w_ptr, cols, cmask, H, BLOCK_K: tl.constexpr, NK: tl.constexpr):
    """The backward's resident W_hh slice, loaded once: one tuple of 4 NK tiles, tile q NK + kc
    holding W_q[k, j] = W_hh[q H + k, j] at [k - kc BLOCK_K, j]."""
    ws = ()
    for q in tl.static_range(4):
        ws = ws + w_tiles(w_ptr, cols, q * H, cmask, H, BLOCK_K, NK, True)
    return ws


@triton.jit
def row_chunk(ptr, row, ks, mask, ring_ptr, r_row, tag, LL: tl.constexpr, WT: tl.constexpr):
    """Columns ks of the rows another program published this step, as WT: from the LL ring
    (r_row, waiting for step ``tag``) or, after the barrier, from the buffer (row)."""
    if LL:
        v = ll_get(ring_ptr, r_row[:, None] + ks[None, :], mask, tag, WT)
    else:
        v = tl.load(ptr + row[:, None] + ks[None, :], mask=mask, other=0.0, cache_modifier=".cg").to(WT)
    return v




# ----------------------------------------------------------------------------------------------
# Launch helpers of the persistent launchers (lstm_persistent.py, rnn_persistent.py,
# ln_lstm_persistent.py): the barrier counter, the LL ring, the launch options, the plan check.
# ----------------------------------------------------------------------------------------------


def sync_counter(T: int, pl: Plan, device) -> torch.Tensor:
    # barrier n waits for n P <= T P arrivals: keep that in int32; one counter per row block
    if T * pl.programs >= 2 ** 31:
        raise ValueError(f"persistent kernels: T={T} x {pl.programs} programs overflows the int32 barrier counter")
    return torch.zeros(pl.row_blocks, dtype=torch.int32, device=device)


def ll_ring(pl: Plan, B: int, N: int, w_hh: torch.Tensor) -> Optional[torch.Tensor]:
    """The LL ring [2, B, N] of tagged words, every one -1 (no step), or None without LL."""
    if not pl.ll:
        return None
    if w_hh.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"persistent kernels: no LL exchange for {w_hh.dtype} (a tagged word over 64 bits)")
    word = torch.int64 if w_hh.dtype == torch.float32 else torch.int32
    return torch.full((2, B, N), -1, dtype=word, device=w_hh.device)


def launch_opts(device: torch.device, pl: Plan) -> dict:
    opts = {"num_warps": pl.num_warps, "num_stages": pl.num_stages}
    # Not while a CUDA graph is being captured: whether a cooperative launch can be a graph node
    # is not something we could check here; there the one-program-per-SM bound alone guards.
    if device.type == "cuda" and config.options().cooperative_launch and not torch.cuda.is_current_stream_capturing():
        opts["launch_cooperative_grid"] = True
    return opts


def record(name: str, compiled) -> None:
    if compiled is None:  # the interpreter returns nothing
        return
    meta = getattr(compiled, "metadata", None)
    LAST_LAUNCH[name] = {
        "n_regs": getattr(compiled, "n_regs", None),
        "n_spills": getattr(compiled, "n_spills", None),
        "shared": getattr(meta, "shared", None),
        "num_warps": getattr(meta, "num_warps", None),
    }


def check_plan(pl: Plan, B: int, H: int, device) -> None:
    # the deadlock guard, again at the launch (a Plan may come from a caller)
    assert pl.row_blocks == triton.cdiv(B, pl.BLOCK_B), "one row block per BLOCK_B batch rows"
    assert pl.programs * pl.BLOCK_H >= H and pl.programs == triton.cdiv(H, pl.BLOCK_H)
    assert not (pl.early and (pl.ll or pl.solo)), "an early arrival is the barrier's: no LL, no solo"
    assert pl.w_chunks == 1 or (pl.resident and not pl.solo and pl.w_chunks == triton.cdiv(H, pl.BLOCK_K)), \
        "w_chunks tiles of BLOCK_K cover H"
    device = torch.device(device)
    needed = pl.total if device.type == "cuda" else pl.programs
    if not grid_fits(needed, max_programs(device)):
        raise RuntimeError(f"persistent grid of {pl.row_blocks} x {pl.programs} programs cannot be "
                           f"co-resident on {device}")
