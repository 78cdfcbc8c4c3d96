"""The shared machinery of the persistent kernels, which run all T steps of one layer in one
launch, forward and backward: the plans (plan, plan_ln) and their limits, the grid barrier, the LL
exchange, the resident W_hh tiles and the launch helpers. The kernels live by cell:
kernels/lstm_persistent.py, rnn_persistent.py, ln_lstm_persistent.py (+ ln_exchange.py).
docs/persistent.md has the design, the barrier and exchange protocols, the plan rules and the
sm_90 compile results behind each limit.

Legend: T steps, B batch rows (row blocks of BLOCK_B <= MAX_B rows, R of them), H hidden units,
G = 4H LSTM gate pre-activations (order i, f, g, o), P programs per row block.
    grid = (P, R): program (p, r) owns the hidden units [p BLOCK_H, (p+1) BLOCK_H) (all gates)
    of the rows of row block r; each step it reads the whole previous row of its rows (h_{t-1};
    backward dG_{t+1} / dP_{t+1}) times its slice of W_hh, which stays on chip (resident, whole or
    in w_chunks tiles) or is streamed from L2 in BLOCK_K chunks. Rows never mix: the P programs
    of a row block meet at their own grid barrier after each step (or exchange tagged words: LL;
    or a solo program owns every unit and waits for no one).
Buffers are the step path's (kernels/lstm.py, rnn.py allocate them), so a persistent forward
pairs with either backward.
Deadlock guard: every program must be resident at once. plan() allows at most one program per
SM; on CUDA the launch is cooperative (the driver refuses a grid that cannot be co-resident),
except while a CUDA graph is captured. Under the Triton interpreter a grid's programs run one
after another, so plan() gives CPU tensors one program per row block covering all of H.
NOT RUN ON A GPU YET: written and checked under the interpreter and by sm_90 compiles only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import config
from ._common import _tile
from .tiles import pow2_block, sm_count

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

# What the last launch of each kernel compiled to (GPU only: n_regs, n_spills, shared bytes).
LAST_LAUNCH: dict = {}

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


# ----------------------------------------------------------------------------------------------
# The shared @triton.jit helpers: grid barrier, LL exchange, resident W_hh tiles, row chunks
# ----------------------------------------------------------------------------------------------


@triton.jit
def program_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's place in the grid (P, R): its index, P (the programs of its row block), its
    row block, and _tile's rows, cols, rmask, cmask, mask."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pid_b = tl.program_id(1)
    rows, cols, rmask, cmask, mask = _tile(pid_b, pid, B, H, BLOCK_B, BLOCK_H)
    return pid, nprog, pid_b, rows, cols, rmask, cmask, mask


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


# The LL exchange (NCCL's low-latency protocol, written anew): each element of the row the others
# need goes out with its step's tag in one word (32-bit for 16-bit values, 64-bit for fp32), and
# readers spin on volatile loads until every word carries the step: no fence, no counter. A ring
# of 2 slots [2, B, N], filled with -1; why 2 slots suffice: docs/persistent.md.
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
    every tile in shared memory). (The two address forms, and the mask computed before the
    address, are the whole-tile kernels' own: the registers depend on them.)"""
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


def plain_launch(pl: Plan, T: int, B: int, H: int, N: int, w_hh: torch.Tensor, fma, ieee, upcast):
    """What a plain (LSTM, RNN) persistent launch passes besides its buffers, after checking the
    plan: (the barrier counter, or None for LL and solo plans; the LL ring of rows of N, or None;
    the kernel's plan constexprs and launch options)."""
    check_plan(pl, B, H, w_hh.device)
    ring = ll_ring(pl, B, N, w_hh)
    sync = None if pl.ll or pl.solo else sync_counter(T, pl, w_hh.device)
    return sync, ring, dict(SOLO=pl.solo, RESIDENT=pl.resident, FMA=fma, IEEE=ieee, UPCAST=upcast,
                            BLOCK_B=pl.BLOCK_B, BLOCK_H=pl.BLOCK_H, BLOCK_K=pl.BLOCK_K, NK=pl.w_chunks,
                            EARLY=pl.early, **launch_opts(w_hh.device, pl))
