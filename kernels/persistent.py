"""The shared machinery of the persistent kernels, which run all T steps of one layer in one
launch, forward and backward: the grid barrier, the LL exchange, the resident W_hh tiles and the
launch helpers (their plans, plan and plan_ln, are kernels/tiles.py's). The kernels live by cell:
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
Deadlock guard: every program must be resident at once. tiles.plan() allows at most one program per
SM; on CUDA the launch is cooperative (the driver refuses a grid that cannot be co-resident),
except while a CUDA graph is captured. Under the Triton interpreter a grid's programs run one
after another, so tiles.plan() gives CPU tensors one program per row block covering all of H.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import config, tiles
from ._common import _tile
from .tiles import Plan

# What the last launch of each kernel compiled to (GPU only: n_regs, n_spills, shared bytes).
LAST_LAUNCH: dict = {}


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
    if not tiles.grid_fits(needed, tiles.max_programs(device)):
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
