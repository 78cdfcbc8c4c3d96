"""Benchmark suite: fused_rnn against cuDNN, the reference loop and torch.compile.

Run: ``fused-rnn bench [--quick] [--shapes S1,S2] [--cells lstm,lnlstm,rnn,lstm_proj] [--dtypes fp16,bf16]``
(or ``python bench/run.py ...``, or ``python -m fused_rnn.bench ...``); ``--help`` lists the rest.

What is measured, for each cell (``lstm``, ``lnlstm`` the layer-norm LSTM, ``rnn`` the tanh RNN;
``lstm_proj``, the LSTM with projections, proj_size = H // 2, only when ``--cells`` names it),
shape (B, T, H; input size = hidden, one layer, one direction, time-major) and dtype:

- each fused_rnn *path* in ``PATHS`` (now ``triton``: ``lstm_sequence``/``rnn_sequence`` with
  ``backend="triton"``); later paths plug in with ``register_path`` (see below);
- ``cudnn``: ``torch.nn.LSTM`` / ``torch.nn.RNN`` on CUDA (fp32 runs TF32 inside cuDNN, the
  torch default); cuDNN has no layer-norm LSTM, so that row is n/a. Always run in fp16 too,
  the baseline of the speed-up column;
- ``reference``: the reference time loop (``backend="reference"``, the seed's Python loop) in fp32;
- ``compile``: ``torch.compile`` of the reference's single-step cell function, looped in Python,
  fp32 (the input projection is one GEMM before the loop, as in the reference).

Modes: ``fwd`` (under ``torch.no_grad()``, the inference forward) and ``fwd+bwd``
(``out.sum().backward()`` with every weight and the input requiring grad; grads reset to None
between runs). On CUDA: ``triton.testing.do_bench(..., return_mode="median")``, and the peak of
``torch.cuda.max_memory_allocated()`` over one fwd+bwd after a reset (the inputs and weights
count, as they sit on the card; ``peak_mem_extra_bytes`` is the peak minus what was allocated
before). A method whose single call takes longer than ``--slow-ms`` is timed by wall clock
(synchronised) over as many calls as ``--slow-budget`` seconds allow (at least 2, at most 10).
torch.compile runs at one shape (S2) in the full sweep, since each case compiles for tens of
seconds; ``--quick`` leaves it out unless ``--baselines`` names it, and runs the reference loop's
forward at the first shape only (it takes up to ~0.8 s a call at these shapes).

Without a GPU (or ``--device cpu``) it runs the CPU mode: a tiny default shape, wall-clock
medians over ``time.perf_counter``, the reference loop and torch.nn on the CPU, and the Triton
paths only under ``TRITON_INTERPRET=1``. CPU numbers say nothing about GPU speed.

Output: a markdown table (stdout and ``OUT/bench.md``) with a machine line and speed-up columns
(baseline time / row time, so > 1 is faster) against cuDNN fp16 and against the reference loop
measured in the same run, pass/miss lines for the project's targets, ``OUT/bench.json`` (written
after every case, so an interrupted sweep keeps what it measured) and ``OUT/bench.png``.
``--render OUT/bench.json`` re-renders the table, targets and plot from a saved run.

Adding a path: ``register_path("persistent", functional_path("persistent"))`` for a new
``backend=`` value of the entry points, or any ``build(problem) -> forward callable`` (e.g. one
that captures the triton path in a CUDA graph and replays it), with ``available(device)``
returning None or why it cannot run. ``--paths`` then selects it by name.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._backend import interpreter_broken, interpreter_on, triton_available
from ._version import __version__
from .cli import _out_dir, _positive_float, _positive_int
from .lstm import lstm_sequence
from .reference import lstm_cell_ref, rnn_cell_ref
from .rnn import rnn_sequence

# --------------------------------------------------------------------------------------- constants
SHAPES: Dict[str, Tuple[int, int, int]] = {  # name -> (B, T, H); input size = H
    "S1": (16, 1024, 256),
    "S2": (64, 512, 512),
    "S3": (256, 256, 1024),
    "S4": (16, 1024, 768),
}
CPU_SHAPE = ("tiny", (4, 16, 32))  # the CPU mode's default: the reference loop takes ms, not s
CELLS = ("lstm", "lnlstm", "rnn", "lstm_proj")
DEFAULT_CELLS = ("lstm", "lnlstm", "rnn")  # lstm_proj (no speed target) only when asked for
CELL_LABEL = {"lstm": "LSTM", "lnlstm": "LN-LSTM", "rnn": "tanh RNN", "lstm_proj": "LSTM, proj H/2"}
LSTM_CELLS = ("lstm", "lnlstm", "lstm_proj")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
MODE_KEY = {"fwd": "fwd_ms", "fwd+bwd": "fwdbwd_ms"}
BASELINES = ("cudnn", "reference", "compile")
SEED_DTYPE = "fp32"  # torch.compile runs in the seed's dtype; the reference loop in each dtype swept
KIND_ORDER = {"fused": 0, "nn": 1, "reference": 2, "compile": 3}

EXIT_USAGE = 2


# ------------------------------------------------------------------------------------ the problem
@dataclass
class Problem:
    """One benchmark input: tensors on ``device`` in ``dtype``; every leaf that a user would train
    (x and the weights) requires grad. h0 / c0 are given (random) and do not."""

    cell: str
    B: int
    T: int
    H: int
    dtype: torch.dtype
    device: torch.device
    x: torch.Tensor
    h0: torch.Tensor
    c0: Optional[torch.Tensor]
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor
    b_hh: torch.Tensor
    ln: Optional[Tuple[torch.Tensor, ...]]
    w_hr: Optional[torch.Tensor] = None  # lstm_proj: [P, H]

    def leaves(self) -> List[torch.Tensor]:
        extra = [self.w_hr] if self.w_hr is not None else []
        return [self.x, self.w_ih, self.w_hh, self.b_ih, self.b_hh] + extra + list(self.ln or ())


def proj_size(cell: str, H: int) -> int:
    """The width of h: H, or H // 2 for lstm_proj."""
    return H // 2 if cell == "lstm_proj" else H


def make_problem(cell: str, B: int, T: int, H: int, dtype: torch.dtype, device) -> Problem:
    """Random inputs (seeded), weights uniform in ±1/√H as torch.nn initialises them."""
    device = torch.device(device)
    torch.manual_seed(1234)
    G = 4 * H if cell in LSTM_CELLS else H
    P = proj_size(cell, H)
    k = 1.0 / math.sqrt(H)

    def u(*shape):
        return torch.empty(*shape, device=device, dtype=torch.float32).uniform_(-k, k).to(dtype)

    def leaf(t):
        return t.detach().requires_grad_(True)

    x = torch.randn(T, B, H, device=device, dtype=torch.float32).to(dtype)
    h0 = (0.5 * torch.randn(B, P, device=device)).to(dtype)
    c0 = (0.5 * torch.randn(B, H, device=device)).to(dtype) if G == 4 * H else None
    ln = None
    if cell == "lnlstm":
        ln = tuple(
            leaf(t.to(dtype))
            for t in (
                1 + 0.1 * torch.randn(4 * H, device=device),
                0.1 * torch.randn(4 * H, device=device),
                1 + 0.1 * torch.randn(H, device=device),
                0.1 * torch.randn(H, device=device),
            )
        )
    return Problem(cell, B, T, H, dtype, device, leaf(x), h0, c0,
                   leaf(u(G, H)), leaf(u(G, P)), leaf(u(G)), leaf(u(G)), ln,
                   leaf(u(P, H)) if cell == "lstm_proj" else None)


# ---------------------------------------------------------------------------- paths (fused_rnn)
Build = Callable[[Problem], Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class Path:
    """A way of running fused_rnn. ``build(problem)`` returns a callable that runs the forward
    and returns ``out`` [T, B, H]; ``available(device)`` returns None, or why it cannot run."""

    name: str
    build: Build
    available: Callable[[torch.device], Optional[str]]
    doc: str = ""
    cells: Tuple[str, ...] = CELLS  # the cells it applies to
    default: bool = True  # run when --paths is not given


PATHS: Dict[str, Path] = {}


def register_path(name: str, build: Build,
                  available: Optional[Callable[[torch.device], Optional[str]]] = None,
                  doc: str = "", cells: Sequence[str] = CELLS, default: bool = True) -> Path:
    """Add (or replace) a fused_rnn path under ``name``; ``--paths`` selects it by that name."""
    if not name or "," in name or name == "none":
        raise ValueError(f"path name must be non-empty, not 'none', without commas: {name!r}")
    path = Path(name, build, available or (lambda device: None), doc, tuple(cells), default)
    PATHS[name] = path
    return path


def functional_path(backend: str, **kwargs) -> Build:
    """A path that calls the functional entry points with ``backend=backend`` (and ``kwargs``)."""

    def build(p: Problem) -> Callable[[], torch.Tensor]:
        if p.cell in LSTM_CELLS:
            def fwd():
                return lstm_sequence(p.x, p.h0, p.c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh,
                                     ln=p.ln, backend=backend, w_hr=p.w_hr, **kwargs)[0]
        else:
            def fwd():
                return rnn_sequence(p.x, p.h0, p.w_ih, p.w_hh, p.b_ih, p.b_hh,
                                    nonlinearity="tanh", backend=backend, **kwargs)[0]
        return fwd

    return build


def _triton_ready(device: torch.device) -> Optional[str]:
    if not triton_available():
        return "the triton package is not importable"
    if device.type == "cpu" and not interpreter_on():
        return "Triton on CPU tensors needs TRITON_INTERPRET=1 (set before Python starts)"
    if device.type == "cpu":
        return interpreter_broken()
    return None


register_path("triton", functional_path("triton"), _triton_ready,
              "fused_rnn's Triton kernels: lstm_sequence / rnn_sequence(backend='triton')")


def _lstm_kernels_module():
    from .kernels import lstm as k  # imports triton

    return k


def _persistent_plans(p: Problem, fused: bool, allow_tf32: bool) -> list:
    """[(plan or None, why not)] of the persistent path, forward and backward, as the launchers
    plan them for this problem."""
    from .kernels import rnn as kr

    if p.cell == "rnn":
        return [kr.persistent_plan(d, p.B, p.H, True, p.dtype, p.device, allow_tf32=allow_tf32) for d in ("fwd", "bwd")]
    k = _lstm_kernels_module()
    return [k.persistent_plan(d, p.B, p.H, p.ln, fused, p.dtype, p.device, allow_tf32=allow_tf32)
            for d in ("fwd", "bwd")]


def _kernel_note(c: "Case", p: Problem) -> Optional[str]:
    """What this fused row's kernels take, so its time can be read against what ran: the step
    kernels' tiles (BLOCK_B x BLOCK_H x BLOCK_K / warps, kernels.lstm._blocks / kernels.rnn._blocks)
    or the persistent plans (programs x row blocks, rows, units, the exchange), as the launchers
    choose them (TF32 as torch's matmul flag says); None for other rows."""
    if c.kind != "fused":
        return None
    from .kernels import _common, lstm as kl, rnn as kr
    from .lstm import _allow_tf32

    tf32 = _allow_tf32(p.x)
    ln = p.ln is not None
    fused = kl.default_fused(p.H, p.ln, p.dtype) if c.cell in ("lstm", "lnlstm") else c.cell == "rnn"
    parts = []
    plans = _persistent_plans(p, fused, tf32) if c.method == "persistent" else [None, None]
    for d, planned in zip(("fwd", "bwd"), plans):
        if planned is not None:
            pl = planned[0]
            if pl is None:
                return None
            how = "LL" if pl.ll else ("solo" if pl.solo else "barrier")
            w = "W_hh on chip" if pl.resident else "W_hh streamed"
            if pl.w_chunks > 1:
                w = f"W_hh in {pl.w_chunks} chunks"
            parts.append(f"{d} {pl.programs}x{pl.row_blocks} programs, {pl.BLOCK_B}x{pl.BLOCK_H}, {how}, {w}")
        else:
            n_sm = _common.sm_count(p.device)
            if c.cell == "rnn":
                t = kr._blocks(p.B, p.H, d, True, p.dtype, n_sm)
            else:
                t = kl._blocks(p.B, p.H, d, fused, ln, p.dtype, n_sm)
            parts.append(f"{d} {t[0]}x{t[1]}x{t[2]}/{t[3]}w")
    what = "plans" if c.method == "persistent" else ("step tiles" if fused else "step tiles (unfused)")
    if c.cell == "lstm_proj":
        what = "step tiles (unfused, cuBLAS h W_hhᵀ and u W_hrᵀ a step)"
    return f"{what}: " + ", ".join(parts)


def _recompute_ready(device: torch.device) -> Optional[str]:
    why = _triton_ready(device)
    if why:
        return why
    try:
        k = _lstm_kernels_module()
    except Exception as e:
        return f"fused_rnn.kernels.lstm does not import ({_short(e)})"
    if not isinstance(getattr(k, "SAVE_GATES", None), bool):
        return "fused_rnn.kernels.lstm has no SAVE_GATES switch"
    return None


def _recompute_build(p: Problem) -> Callable[[], torch.Tensor]:
    """The triton path with SAVE_GATES off for the forward call: backward recomputes the gate
    pre-activations instead of reading the saved [T, B, 4H] (kernels/lstm.py asks for both timed)."""
    inner = functional_path("triton")(p)
    k = _lstm_kernels_module()

    def fwd():
        saved = k.SAVE_GATES
        k.SAVE_GATES = False
        try:
            return inner()
        finally:
            k.SAVE_GATES = saved

    return fwd


register_path("triton-recompute", _recompute_build, _recompute_ready,
              "the triton path with kernels.lstm.SAVE_GATES=False (gates recomputed in backward)",
              cells=("lstm", "lnlstm"), default=False)  # the projection path always saves them


def _on_path(path: str) -> Build:
    """The triton path's kernel choice (lstm_sequence / rnn_sequence's), with the time loop on
    ``path`` (fused_rnn._paths) for the forward and the backward: the autograd Functions carry
    the path from one to the other. A persistent problem that kernels.persistent.plan refuses is
    an error here, not a silent step-path row."""

    def build(p: Problem) -> Callable[[], torch.Tensor]:
        from .lstm import LSTMFunction, LSTMProjFunction, _allow_tf32
        from .reference import LN_EPS
        from .rnn import RNNFunction

        allow_tf32 = _allow_tf32(p.x)
        if p.cell == "lstm_proj":  # step or graph (the persistent path does not list this cell)
            def fwd():
                return LSTMProjFunction.apply(p.x, p.h0, p.c0, p.w_ih, p.w_hh, p.w_hr, p.b_ih, p.b_hh,
                                              None, None, None, None, None, LN_EPS, allow_tf32, path)[0]
            return fwd
        fused = _lstm_kernels_module().default_fused(p.H, p.ln, p.dtype) if p.cell != "rnn" else True
        if path == "persistent":
            for d, (plan, why) in zip(("fwd", "bwd"), _persistent_plans(p, fused, allow_tf32)):
                if plan is None:
                    raise RuntimeError(f"persistent {d} not possible: {why}")
        if p.cell in ("lstm", "lnlstm"):
            k = _lstm_kernels_module()
            gw, gb, cw, cb = p.ln if p.ln is not None else (None,) * 4

            def fwd():
                return LSTMFunction.apply(p.x, p.h0, p.c0, p.w_ih, p.w_hh, p.b_ih, p.b_hh, gw, gb, cw, cb, None,
                                          LN_EPS, allow_tf32, fused, k.SAVE_GATES, path)[0]
        else:
            def fwd():
                return RNNFunction.apply(p.x, p.h0, p.w_ih, p.w_hh, p.b_ih, p.b_hh, None, "tanh", allow_tf32, True,
                                         path)[0]
        return fwd

    return build


def _graph_ready(device: torch.device) -> Optional[str]:
    why = _triton_ready(device)
    if why:
        return why
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


# Not run by default (unmeasured on any GPU so far; the quick GPU sweep has a tight budget):
# `--paths triton,graph,persistent` times them against the eager step path in the same run.
register_path("graph", _on_path("graph"), _graph_ready,
              "the triton path's step launches captured per shape in a CUDA graph and replayed",
              default=False)
register_path("persistent", _on_path("persistent"), _triton_ready,
              "one persistent kernel launch for all T steps (LSTM, layer-norm LSTM, RNN)",
              cells=("lstm", "lnlstm", "rnn"), default=False)


# ------------------------------------------------------------------------------------- baselines
def _build_nn(p: Problem):
    """torch.nn.LSTM / nn.RNN holding the problem's weights (cuDNN on CUDA)."""
    if p.cell == "lnlstm":
        raise ValueError("cuDNN has no layer-norm LSTM")
    lstm = p.cell in LSTM_CELLS
    cls = torch.nn.LSTM if lstm else torch.nn.RNN
    extra = {} if lstm else {"nonlinearity": "tanh"}
    if p.cell == "lstm_proj":
        extra = {"proj_size": proj_size(p.cell, p.H)}
    m = cls(p.H, p.H, num_layers=1, **extra).to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        m.weight_ih_l0.copy_(p.w_ih)
        m.weight_hh_l0.copy_(p.w_hh)
        m.bias_ih_l0.copy_(p.b_ih)
        m.bias_hh_l0.copy_(p.b_hh)
        if p.w_hr is not None:
            m.weight_hr_l0.copy_(p.w_hr)
    if p.device.type == "cuda":
        m.flatten_parameters()
    # Only the module's weights and x are trained here: drop the problem's own weight leaves so
    # that their memory does not count against cuDNN.
    p.w_ih = p.w_hh = p.b_ih = p.b_hh = p.w_hr = None
    h0 = p.h0.unsqueeze(0)
    state = (h0, p.c0.unsqueeze(0)) if lstm else h0
    x = p.x

    def fwd():
        return m(x, state)[0]

    return fwd, [x] + list(m.parameters())


def _build_reference(p: Problem):
    return functional_path("reference")(p), p.leaves()


def _build_compile(p: Problem):
    """torch.compile of the reference's one-step cell; the time loop stays in Python."""
    torch._dynamo.reset()  # one code object serves every shape: start each case from a clean cache
    if p.cell == "lstm_proj":
        def step(xp_t, h, c, w_hh_t, w_hr_t):
            u, c = lstm_cell_ref(xp_t + h @ w_hh_t, c)
            return u @ w_hr_t, c
    elif p.cell in ("lstm", "lnlstm"):
        def step(xp_t, h, c, w_hh_t, *ln):
            return lstm_cell_ref(xp_t + h @ w_hh_t, c, ln if ln else None)
    else:
        def step(xp_t, h, w_hh_t):
            return rnn_cell_ref(xp_t + h @ w_hh_t, "tanh")
    cstep = torch.compile(step, dynamic=False)

    def fwd():
        xp = F.linear(p.x, p.w_ih, p.b_ih + p.b_hh)
        w_hh_t = p.w_hh.t()
        h, c, outs = p.h0, p.c0, []
        for t in range(p.T):
            if p.cell == "rnn":
                h = cstep(xp[t], h, w_hh_t)
            elif p.cell == "lstm_proj":
                h, c = cstep(xp[t], h, c, w_hh_t, p.w_hr.t())
            else:
                h, c = cstep(xp[t], h, c, w_hh_t, *(p.ln or ()))
            outs.append(h)
        return torch.stack(outs)

    return fwd, p.leaves()


# ------------------------------------------------------------------------------------- the plan
@dataclass
class Case:
    cell: str
    shape: str
    B: int
    T: int
    H: int
    dtype: str
    kind: str  # fused | nn | reference | compile
    method: str  # path name | cudnn | torch.nn | reference | compile
    modes: List[str]
    note: str = ""  # a note that travels to the record (e.g. why modes were cut)
    na: str = ""  # set: not applicable, nothing runs (e.g. cuDNN has no LN-LSTM)


@dataclass
class Settings:
    device: torch.device
    quick: bool
    warmup_ms: int
    rep_ms: int
    slow_ms: float
    slow_budget_s: float
    time_limit_s: Optional[float]
    base_dtype: str  # the dtype of the nn baseline of the speed-up column
    min_reps: int = 2
    max_reps: int = 10
    deadline: Optional[float] = None


def nn_method(device: torch.device) -> str:
    return "cudnn" if device.type == "cuda" else "torch.nn"


def make_plan(cells, shapes, dtypes, paths, baselines, modes, s: Settings) -> List[Case]:
    """Every case to run, most important first (fused and cuDNN before the slow baselines), so
    that a time limit cuts the least useful measurements."""
    plan: List[Case] = []
    nnm = nn_method(s.device)
    for cell in cells:
        for si, (sname, (B, T, H)) in enumerate(shapes):
            def case(kind, method, dtype, ms=modes, note="", na=""):
                plan.append(Case(cell, sname, B, T, H, dtype, kind, method, list(ms), note, na))

            for dt in dtypes:
                for path in paths:
                    if cell in PATHS[path].cells:
                        case("fused", path, dt)
            if "cudnn" in baselines:
                nn_dtypes = [d for d in DTYPES if d in dtypes or d == s.base_dtype]
                if cell == "lnlstm":
                    case("nn", nnm, "–", ms=[], na="cuDNN (torch.nn) has no layer-norm LSTM")
                else:
                    for dt in nn_dtypes:
                        case("nn", nnm, dt,
                             note="baseline of the speed-up column" if dt not in dtypes else "")
            gpu = s.device.type == "cuda"
            for kind in ("reference", "compile"):
                if kind not in baselines:
                    continue
                # T3 compares with the reference loop "in the same dtype": it runs in every dtype
                # of the sweep (it computes in fp32 inside, as the seed's loop would under
                # autocast; storage, casts and GEMM inputs follow the dtype)
                kdts = list(dtypes) if kind == "reference" else [SEED_DTYPE]
                if gpu and s.quick:
                    if si == 0:
                        for dt in kdts:
                            case(kind, kind, dt, ms=[m for m in modes if m == "fwd"],
                                 note="quick mode: fwd at the first shape only (bounded)")
                elif gpu and kind == "compile":
                    # Each case compiles two graphs (no_grad, grad) for tens of seconds: one
                    # shape, S2 (the anchors' torch.compile figure) or else the first.
                    names = [n for n, _ in shapes]
                    if sname == ("S2" if "S2" in names else names[0]):
                        case(kind, kind, SEED_DTYPE, note="torch.compile at one shape only "
                                                          "(compile time)")
                else:
                    for dt in kdts:
                        case(kind, kind, dt)
    plan = [c for c in plan if c.modes or c.na]
    # fused and cuDNN first, then every reference loop, then torch.compile (its first call
    # compiles for tens of seconds)
    order = sorted(range(len(plan)), key=lambda i: (max(1, KIND_ORDER[plan[i].kind]), i))
    return [plan[i] for i in order]


# ------------------------------------------------------------------------------------ measuring
class _Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): not an Exception, so no per-case handler swallows it."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear(grads: Sequence[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


def _timed_call(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(fn: Callable[[], None], grads: Sequence[torch.Tensor], s: Settings) -> dict:
    """Time ``fn``: two untimed-for-the-result calls first (JIT, compile, handles), then
    do_bench's median on CUDA, or a wall-clock median where a call is slow or there is no GPU."""
    first_s = _timed_call(fn, s.device)  # includes Triton JIT / torch.compile
    _clear(grads)
    one_s = _timed_call(fn, s.device)
    _clear(grads)
    if s.device.type == "cuda" and one_s * 1e3 <= s.slow_ms:
        from triton.testing import do_bench

        # do_bench repeats for `rep` ms: make that at least ~10 calls for calls of a few ms
        # (S1 cuDNN bf16 fwd+bwd is ~36 ms: rep=100 alone would give a median of 2).
        rep = int(max(s.rep_ms, min(10 * one_s * 1e3, s.slow_budget_s * 1e3 / 2)))
        ms = do_bench(fn, warmup=s.warmup_ms, rep=rep, grad_to_none=list(grads) or None,
                      return_mode="median")
        return {"ms": float(ms), "timer": "do_bench median", "first_call_s": first_s}
    reps = int(min(s.max_reps, max(s.min_reps, s.slow_budget_s // max(one_s, 1e-9))))
    samples = [one_s]
    for _ in range(reps - 1):
        samples.append(_timed_call(fn, s.device))
        _clear(grads)
    kind = "wall-clock" if s.device.type == "cpu" else "wall-clock (slow method)"
    return {"ms": statistics.median(samples) * 1e3,
            "timer": f"{kind} median of {len(samples)}", "first_call_s": first_s}


def peak_memory(fn: Callable[[], None], grads: Sequence[torch.Tensor], device) -> Tuple[int, int]:
    """(max_memory_allocated over one call after a reset, the same minus what was allocated)."""
    _clear(grads)
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    _clear(grads)
    return int(peak), int(peak - before)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _fallback_warnings(fn: Callable[[], None]) -> List[str]:
    """Run ``fn`` once and return the entry points' "using the reference path" warnings.
    fused_rnn warns once per process and reason, so the record of reasons already warned is set
    aside for the call and put back after."""
    from . import _backend

    with _backend.warnings_unsuppressed(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "reference path" in str(w.message)]


def _new_record(c: Case, device: torch.device) -> dict:
    return {
        "cell": c.cell, "shape": c.shape, "B": c.B, "T": c.T, "H": c.H, "dtype": c.dtype,
        "kind": c.kind, "method": c.method, "device": device.type, "modes": list(c.modes),
        "status": "n/a" if c.na else "pending", "fwd_ms": None, "fwdbwd_ms": None,
        "timer": {}, "first_call_s": {}, "peak_mem_bytes": None, "peak_mem_extra_bytes": None,
        "notes": [n for n in (c.na, c.note) if n], "fallback": False,
    }


def run_case(c: Case, s: Settings, progress: Callable[[str], Callable[[str], None]]) -> dict:
    rec = _new_record(c, s.device)
    if c.na:
        return rec
    labels = [f"{c.cell} {c.shape} {c.dtype} {c.method} {m}" for m in c.modes]
    if c.kind == "fused":
        why = PATHS[c.method].available(s.device)
        if why:
            for lab in labels:
                progress(lab)(f"skipped: {why}")
            rec["status"] = "skipped"
            rec["notes"].append(why)
            return rec
    fwd = grads = p = None
    try:
        if s.deadline is not None and time.perf_counter() > s.deadline:
            raise TimeoutError("time limit reached")
        dtype = DTYPES[c.dtype]
        p = make_problem(c.cell, c.B, c.T, c.H, dtype, s.device)
        if c.kind == "fused":
            fwd, grads = PATHS[c.method].build(p), p.leaves()
        elif c.kind == "nn":
            fwd, grads = _build_nn(p)
        elif c.kind == "reference":
            fwd, grads = _build_reference(p)
        else:
            fwd, grads = _build_compile(p)
    except TimeoutError as e:
        for lab in labels:
            progress(lab)("skipped: time limit")
        rec["status"] = "skipped"
        rec["notes"].append(f"not run: {e}")
        return rec
    except Exception as e:  # a broken baseline must not stop the sweep: record and go on
        for lab in labels:
            progress(lab)(f"error: {_short(e)}")
        rec["status"] = "error"
        rec["notes"].append(f"setup: {_short(e)}")
        return rec

    def fwd_only():
        with torch.no_grad():
            fwd()

    if c.kind == "fused":
        try:
            fell = _fallback_warnings(fwd_only)
        except Exception:
            fell = []  # the measurement below meets the same error and records it
        if fell:  # the entry point ran the reference path: this row times no kernel of ours
            rec["fallback"] = True
            rec["notes"].append("FELL BACK to the reference path: " + fell[0])
        else:
            try:
                note = _kernel_note(c, p)
            except Exception as e:  # recorded in the row; the measurement goes on
                note = f"kernel configuration: {_short(e)}"
            if note:
                rec["notes"].append(note)

    def fwd_bwd():
        fwd().sum().backward()

    ok = skipped = 0
    try:
        for mode, lab in zip(c.modes, labels):
            done = progress(lab)
            if s.deadline is not None and time.perf_counter() > s.deadline:
                done("skipped: time limit")
                rec["notes"].append(f"{mode}: not run (time limit)")
                skipped += 1
                continue
            fn = fwd_only if mode == "fwd" else fwd_bwd
            try:
                r = measure(fn, grads if mode == "fwd+bwd" else [], s)
                rec[MODE_KEY[mode]] = r["ms"]
                rec["timer"][mode] = r["timer"]
                rec["first_call_s"][mode] = round(r["first_call_s"], 4)
                if mode == "fwd+bwd" and s.device.type == "cuda":
                    rec["peak_mem_bytes"], rec["peak_mem_extra_bytes"] = peak_memory(
                        fn, grads, s.device)
                ok += 1
                done(f"{r['ms']:.4g} ms ({r['timer']})")
            except Exception as e:  # OOM, a missing kernel, a compile failure: record, go on
                done(f"error: {_short(e)}")
                rec["notes"].append(f"{mode}: {_short(e)}")
                if s.device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                _clear(grads)
    except _Interrupted as e:  # keep what this case measured before the signal
        rec["status"] = "partial" if ok else "skipped"
        rec["notes"].append("interrupted")
        e.record = rec
        raise
    if ok == len(c.modes):
        rec["status"] = "ok"
    else:
        rec["status"] = "partial" if ok else ("skipped" if skipped == len(c.modes) else "error")
    fwd = grads = p = None  # drop the problem before the next case allocates its own
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


# --------------------------------------------------------------------------------- machine info
def _cudnn_version() -> Optional[str]:
    try:
        v = torch.backends.cudnn.version()
    except Exception:
        return None
    if not v:
        return None
    if v >= 90000:  # cuDNN 9: major*10000 + minor*100 + patch
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"  # cuDNN 8: major*1000 + minor*100 + patch


def _git_rev() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                             capture_output=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, text=True, capture_output=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


def machine_info(device: torch.device) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = None
    cuda = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device.type,
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version() if cuda else None,
        "python": platform.python_version(),
        "fused_rnn": __version__,
        "git": _git_rev(),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "triton_interpret": interpreter_on(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict) -> str:
    if m.get("device") == "cuda":
        where = f"{m.get('gpu')} | CUDA {m.get('cuda')} | cuDNN {m.get('cudnn') or 'n/a'}"
    else:
        where = (f"CPU only, no CUDA GPU ({m.get('cpu')}, {m.get('cpu_count')} cores) | "
                 f"cuDNN n/a | TRITON_INTERPRET={'1' if m.get('triton_interpret') else '0'}")
    git = f" (git {m['git']})" if m.get("git") else ""
    return (f"machine: {where} | torch {m.get('torch')} | triton {m.get('triton')} | "
            f"fused_rnn {m.get('fused_rnn')}{git} | {m.get('date')}")


# ------------------------------------------------------------------------------------- targets
TARGETS = {
    "T1": "LSTM bf16 ≤ 1/3 of cuDNN bf16 at S1, S2, S4; ≤ 0.55× at S3",
    "T2": "LSTM, our fastest dtype ≤ cuDNN fp16, every shape",
    "T3": "LSTM ≥ 50× faster than the reference loop in the same dtype at S1, S2, S4",
    "T4": "layer-norm LSTM ≤ 1.5× our plain LSTM (same shape, dtype)",
    "T5": "tanh RNN, our fastest dtype ≤ cuDNN nn.RNN fp16",
    "T6": "LSTM peak memory of fwd+bwd at S2 ≤ cuDNN's (same dtype)",
}
T1_LIMIT = {"S1": 1 / 3, "S2": 1 / 3, "S3": 0.55, "S4": 1 / 3}
T3_SHAPES = ("S1", "S2", "S4")
T3_SPEEDUP = 50.0
T4_LIMIT = 1.5
_EPS = 1e-9  # a ratio equal to its limit passes


def _usable(r: dict, mode_key: str) -> bool:
    return (r.get("device") == "cuda" and r.get(mode_key) is not None
            and not r.get("fallback", False))


def _ours(recs, cell, shape, mode_key, dtype=None):
    """The fastest fused record (any path; any dtype unless given) with a time for mode_key."""
    c = [r for r in recs if r["kind"] == "fused" and r["cell"] == cell and r["shape"] == shape
         and (dtype is None or r["dtype"] == dtype) and _usable(r, mode_key)]
    return min(c, key=lambda r: r[mode_key]) if c else None


def _find(recs, kind, cell, shape, dtype, mode_key):
    for r in recs:
        if (r["kind"] == kind and r["cell"] == cell and r["shape"] == shape
                and r["dtype"] == dtype and _usable(r, mode_key)):
            return r
    return None


def _ordered_shapes(recs) -> List[str]:
    """The named shapes in S1..S4 order, then the custom ones in the order they appear."""
    seen: List[str] = []
    for r in recs:
        if r["shape"] not in seen:
            seen.append(r["shape"])
    named = [n for n in SHAPES if n in seen]
    return named + [n for n in seen if n not in SHAPES]


def evaluate_targets(records: Sequence[dict]) -> List[dict]:
    """Pass/miss of each target wherever its data is present (CUDA records only).

    Each result: id, shape, mode, passed, value (a ratio; for T3 the speed-up), limit, text, and
    the record it judges (``cell``/``dtype``/``method``), so the table can mark that row."""
    recs = list(records)
    shapes = _ordered_shapes(recs)
    out: List[dict] = []

    def add(tid, shape, mode, ours, value, limit, passed, text):
        out.append({"id": tid, "shape": shape, "mode": mode, "cell": ours["cell"],
                    "dtype": ours["dtype"], "method": ours["method"], "value": value,
                    "limit": limit, "passed": bool(passed), "text": text})

    def who(r):
        return f"{r['method']} {r['dtype']}"

    for mode, key in MODE_KEY.items():
        for shape in shapes:
            # T1: LSTM bf16 against cuDNN bf16.
            lim = T1_LIMIT.get(shape)
            ours = _ours(recs, "lstm", shape, key, "bf16")
            base = _find(recs, "nn", "lstm", shape, "bf16", key)
            if lim is not None and ours and base:
                v = ours[key] / base[key]
                add("T1", shape, mode, ours, v, lim, v <= lim + _EPS,
                    f"{who(ours)} {ours[key]:.4g} ms / cuDNN bf16 {base[key]:.4g} ms = {v:.3f}× "
                    f"(limit ≤ {lim:.3g}×)")
            # T2: our fastest dtype against cuDNN fp16.
            ours = _ours(recs, "lstm", shape, key)
            base = _find(recs, "nn", "lstm", shape, "fp16", key)
            if ours and base:
                v = ours[key] / base[key]
                add("T2", shape, mode, ours, v, 1.0, v <= 1.0 + _EPS,
                    f"{who(ours)} {ours[key]:.4g} ms / cuDNN fp16 {base[key]:.4g} ms = {v:.3f}× "
                    f"(limit ≤ 1×)")
            # T3: against the reference loop in the same dtype.
            for dt in DTYPES:
                mine = _ours(recs, "lstm", shape, key, dt)
                base = _find(recs, "reference", "lstm", shape, dt, key)
                if shape in T3_SHAPES and mine and base:
                    v = base[key] / mine[key]
                    add("T3", shape, mode, mine, v, T3_SPEEDUP, v >= T3_SPEEDUP - _EPS,
                        f"reference {dt} {base[key]:.4g} ms / {who(mine)} {mine[key]:.4g} ms = "
                        f"{v:.1f}× faster (need ≥ {T3_SPEEDUP:g}×)")
            # T4: layer-norm LSTM against our plain LSTM, per dtype.
            for dt in DTYPES:
                ln = _ours(recs, "lnlstm", shape, key, dt)
                plain = _ours(recs, "lstm", shape, key, dt)
                if ln and plain:
                    v = ln[key] / plain[key]
                    add("T4", shape, mode, ln, v, T4_LIMIT, v <= T4_LIMIT + _EPS,
                        f"LN {who(ln)} {ln[key]:.4g} ms / plain {who(plain)} {plain[key]:.4g} ms "
                        f"= {v:.3f}× (limit ≤ {T4_LIMIT:g}×)")
            # T5: tanh RNN, our fastest dtype against cuDNN nn.RNN fp16.
            ours = _ours(recs, "rnn", shape, key)
            base = _find(recs, "nn", "rnn", shape, "fp16", key)
            if ours and base:
                v = ours[key] / base[key]
                add("T5", shape, mode, ours, v, 1.0, v <= 1.0 + _EPS,
                    f"{who(ours)} {ours[key]:.4g} ms / cuDNN nn.RNN fp16 {base[key]:.4g} ms "
                    f"= {v:.3f}× (limit ≤ 1×)")
    # T6: peak memory of fwd+bwd at S2, per dtype, our smallest path against cuDNN.
    for dt in DTYPES:
        c = [r for r in recs if r["kind"] == "fused" and r["cell"] == "lstm" and r["shape"] == "S2"
             and r["dtype"] == dt and r.get("device") == "cuda" and r.get("peak_mem_bytes")
             and not r.get("fallback", False)]
        base = [r for r in recs if r["kind"] == "nn" and r["cell"] == "lstm" and r["shape"] == "S2"
                and r["dtype"] == dt and r.get("device") == "cuda" and r.get("peak_mem_bytes")]
        if c and base:
            ours = min(c, key=lambda r: r["peak_mem_bytes"])
            b = base[0]["peak_mem_bytes"]
            v = ours["peak_mem_bytes"] / b
            add("T6", "S2", "fwd+bwd", ours, v, 1.0, v <= 1.0 + _EPS,
                f"{who(ours)} {ours['peak_mem_bytes'] / 2**20:.1f} MiB / cuDNN {dt} "
                f"{b / 2**20:.1f} MiB = {v:.3f}× (limit ≤ 1×)")
    return out


# ------------------------------------------------------------------------------------ rendering
def _fmt_ms(v) -> str:
    return "–" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


def _fmt_x(base, v) -> str:
    if base is None or v is None or v <= 0:
        return "–"
    x = base / v
    return f"{x:.2f}×" if x < 10 else (f"{x:.1f}×" if x < 100 else f"{x:.0f}×")


def _method_label(r: dict) -> str:
    if r["kind"] == "fused":
        return f"fused_rnn {r['method']}"
    if r["kind"] == "nn":
        return "cuDNN" if r["method"] == "cudnn" else "torch.nn (CPU)"
    if r["kind"] == "reference":
        return "reference loop"
    return "torch.compile cell"


def sort_records(records: Sequence[dict]) -> List[dict]:
    cells = {c: i for i, c in enumerate(CELLS)}
    shapes = {s: i for i, s in enumerate(_ordered_shapes(records))}
    dts = {d: i for i, d in enumerate(DTYPES)}
    return sorted(records, key=lambda r: (cells.get(r["cell"], 9), shapes[r["shape"]],
                                          KIND_ORDER[r["kind"]], r["method"],
                                          dts.get(r["dtype"], -1)))


def render_table(data: dict) -> str:
    recs = data["results"]
    base_dtype = data["config"]["base_dtype"]
    cuda = data["machine"].get("device") == "cuda"
    base_name = f"cuDNN {base_dtype}" if cuda else f"torch.nn {base_dtype} (CPU)"
    marks: Dict[tuple, Dict[str, bool]] = {}
    for t in data.get("targets", []):
        k = (t["cell"], t["shape"], t["dtype"], t["method"])
        marks.setdefault(k, {})
        marks[k][t["id"]] = marks[k].get(t["id"], True) and t["passed"]
    head = ("| cell | shape (B,T,H) | dtype | method | fwd ms | fwd+bwd ms | peak MiB f+b | "
            f"× {base_name} (fwd / f+b) | × reference loop (fwd / f+b) | targets | notes |")
    lines = [head, "|" + "---|" * 11]
    for r in sort_records(recs):
        bcell = "lstm" if r["cell"] == "lnlstm" else r["cell"]
        base = next((b for b in recs if b["kind"] == "nn" and b["cell"] == bcell
                     and b["shape"] == r["shape"] and b["dtype"] == base_dtype), None)
        refs = [b for b in recs if b["kind"] == "reference" and b["cell"] == r["cell"]
                and b["shape"] == r["shape"]]
        # the reference loop in the row's dtype, else in the seed's
        ref = next((b for b in refs if b["dtype"] == r["dtype"]),
                   next((b for b in refs if b["dtype"] == SEED_DTYPE), None))
        xb = " / ".join(_fmt_x(base and base[k], r[k]) for k in MODE_KEY.values())
        if r["cell"] == "lnlstm" and base and xb != "– / –":
            xb += " †"
        xr = " / ".join(_fmt_x(ref and ref[k], r[k]) for k in MODE_KEY.values())
        mem = "–" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
        tm = marks.get((r["cell"], r["shape"], r["dtype"], r["method"]), {})
        tcol = " ".join(f"{k} {'✓' if v else '✗'}" for k, v in sorted(tm.items()))
        notes = list(r.get("notes", []))
        slow = {m: t for m, t in r.get("timer", {}).items() if "do_bench" not in t and cuda}
        notes += [f"{m}: {t}" for m, t in slow.items()]
        if r["status"] not in ("ok", "n/a"):
            notes.insert(0, r["status"])
        shape = f"{r['shape']} ({r['B']},{r['T']},{r['H']})"
        f_ms, fb_ms = ("n/a", "n/a") if r["status"] == "n/a" else (
            _fmt_ms(r["fwd_ms"]), _fmt_ms(r["fwdbwd_ms"]))
        lines.append(f"| {CELL_LABEL.get(r['cell'], r['cell'])} | {shape} | {r['dtype']} | "
                     f"{_method_label(r)} | {f_ms} | {fb_ms} | "
                     f"{mem} | {xb} | {xr} | {tcol} | {'; '.join(notes).replace('|', '/')} |")
    return "\n".join(lines)


def render_targets(data: dict) -> str:
    if data["machine"].get("device") != "cuda":
        return ("Targets: not evaluated: they are defined against cuDNN on a CUDA GPU, and this "
                "run had none.")
    res = data.get("targets", [])
    lines = ["Targets (pass/miss where this run has the data; ratios are of medians from this run):"]
    for tid, desc in TARGETS.items():
        mine = [t for t in res if t["id"] == tid]
        if not mine:
            lines.append(f"- {tid} {desc}: not evaluated (no data in this run)")
            continue
        n_pass = sum(t["passed"] for t in mine)
        lines.append(f"- {tid} {desc}: {n_pass}/{len(mine)} pass")
        for t in mine:
            lines.append(f"  - {'PASS' if t['passed'] else 'MISS'} {t['shape']} {t['mode']}: "
                         f"{t['text']}")
    return "\n".join(lines)


def render_fastest_paths(data: dict) -> str:
    """Which fused path was fastest for each cell, shape, dtype and mode, by how much over the
    next one: the evidence for fused_rnn/_paths.py's "auto" policy (empty when the run timed
    fewer than two paths anywhere)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in data["results"]:
        if r["kind"] == "fused" and not r.get("fallback", False):
            groups.setdefault((r["cell"], r["shape"], r["dtype"]), []).append(r)
    lines = []
    for (cell, shape, dtype), rs in groups.items():
        for mode, key in MODE_KEY.items():
            timed = sorted((r for r in rs if r.get(key) is not None), key=lambda r: r[key])
            if len(timed) < 2:
                continue
            best, second = timed[0], timed[1]
            lines.append(f"- {CELL_LABEL.get(cell, cell)} {shape} {dtype} {mode}: {best['method']} "
                         f"{best[key]:.4g} ms, {second[key] / best[key]:.2f}× faster than "
                         f"{second['method']} ({second[key]:.4g} ms)")
    if not lines:
        return ""
    return "\n".join(["Fastest path (for the auto policy in fused_rnn/_paths.py):"] + lines)


def render_markdown(data: dict) -> str:
    cfg, m = data["config"], data["machine"]
    cuda = m.get("device") == "cuda"
    timing = (f"triton.testing.do_bench median (warmup {cfg['warmup_ms']} ms, rep {cfg['rep_ms']} "
              f"ms); a call slower than {cfg['slow_ms']:g} ms: wall-clock median of ≤ 10"
              if cuda else "time.perf_counter wall-clock medians (CPU mode)")
    table = render_table(data)
    parts = [
        f"# fused_rnn benchmark ({cfg['mode']})",
        "",
        machine_line(m),
        "",
        f"Timing: {timing}. fwd runs under torch.no_grad(); fwd+bwd is out.sum().backward() "
        "with x and every weight requiring grad. Speed-up = baseline time / row time "
        "(> 1: the row is faster). Peak MiB: torch.cuda.max_memory_allocated over one fwd+bwd "
        "after a reset, inputs and weights included.",
        "",
        table,
        "",
    ]
    if "†" in table:
        parts.append("† LN-LSTM has no cuDNN kernel: its speed-up column compares against "
                     f"{'cuDNN' if cuda else 'torch.nn'}'s plain LSTM.")
    if cuda and m.get("tf32_cudnn"):
        parts.append("cuDNN fp32 runs TF32 (torch.backends.cudnn.allow_tf32, the torch default).")
    if data.get("interrupted"):
        parts.append(f"**Run cut short:** {data['interrupted']}; the cases not reached are missing.")
    fastest = render_fastest_paths(data)
    if fastest:
        parts += ["", fastest]
    parts += ["", render_targets(data), ""]
    return "\n".join(parts)


def save_plot(data: dict, path: str) -> Optional[str]:
    """A bar chart per cell and mode (log scale). Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib not importable ({_short(e)}): plot skipped"
    recs = [r for r in data["results"] if r["fwd_ms"] is not None or r["fwdbwd_ms"] is not None]
    if not recs:
        return "no timings to plot: plot skipped"
    cells = [c for c in CELLS if any(r["cell"] == c for r in recs)]
    shapes = _ordered_shapes(sort_records(recs))
    series = []
    for r in sort_records(recs):
        s = (_method_label(r), r["dtype"])
        if s not in series:
            series.append(s)
    fig, axes = plt.subplots(2, len(cells), figsize=(5.5 * len(cells), 7.5), squeeze=False)
    width = 0.8 / max(1, len(series))
    cmap = plt.get_cmap("tab20")
    for ci, cell in enumerate(cells):
        for mi, (mode, key) in enumerate(MODE_KEY.items()):
            ax = axes[mi][ci]
            for si, (label, dt) in enumerate(series):
                xs, ys = [], []
                for xi, sh in enumerate(shapes):
                    r = next((r for r in recs if r["cell"] == cell and r["shape"] == sh
                              and _method_label(r) == label and r["dtype"] == dt), None)
                    if r is not None and r[key] is not None:
                        xs.append(xi + (si - (len(series) - 1) / 2) * width)
                        ys.append(r[key])
                if xs:
                    ax.bar(xs, ys, width, label=f"{label} {dt}", color=cmap(si % 20))
            ys_all = [r[key] for r in recs if r["cell"] == cell and r[key]]
            if ys_all:  # log-scale bars need a floor under the smallest one
                ax.set_ylim(bottom=min(ys_all) / 2)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes)
            ax.set_yscale("log")
            ax.set_title(f"{CELL_LABEL[cell]} {mode}")
            ax.set_ylabel("ms (log)")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8)
    fig.suptitle(machine_line(data["machine"]), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(data: dict, out_dir: str, plot: bool = True) -> List[str]:
    """bench.json, bench.md and (if plot) bench.png in out_dir; returns messages for stderr."""
    os.makedirs(out_dir, exist_ok=True)
    msgs = []
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(render_markdown(data))
    if plot:
        why = save_plot(data, os.path.join(out_dir, "bench.png"))
        if why:
            msgs.append(why)
    return msgs


# ------------------------------------------------------------------------------------------ CLI
def _csv(choices, what, none_ok=False):
    """An argparse type: a comma-separated subset of ``choices``; "none" (the empty selection)
    only where ``none_ok`` (paths, baselines): elsewhere an empty list would mean the default."""
    def parse(s: str) -> List[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        if none_ok and s.strip() == "none":
            return []
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(bad)}; choose from {', '.join(choices)}")
        if not items:
            raise argparse.ArgumentTypeError(f"empty {what} list")
        return list(dict.fromkeys(items))

    return parse


def _shape(s: str) -> Tuple[str, Tuple[int, int, int]]:
    parts = s.split(",")
    try:
        B, T, H = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape wants B,T,H (three integers), got {s!r}")
    if min(B, T, H) < 1:
        raise argparse.ArgumentTypeError(f"--shape sizes must be ≥ 1, got {s!r}")
    return f"B{B}T{T}H{H}", (B, T, H)


def _paths_arg(s: str) -> List[str]:
    return _csv(tuple(PATHS), "path", none_ok=True)(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fused-rnn bench",
        description="fused_rnn against cuDNN, the reference loop and torch.compile of its cell.",
        epilog="Targets (T1-T6) are evaluated under the table when the data is present. "
               "Exit status: 0 measured something, 1 measured nothing (every case failed or "
               "was skipped; the last line says why), 2 usage error.")
    p.add_argument("--quick", action="store_true",
                   help="S1,S2; fp16,bf16; short do_bench; the reference loop fwd at the first "
                        "shape only; no torch.compile unless --baselines names it (GPU)")
    p.add_argument("--shapes", type=_csv(tuple(SHAPES), "shape"),
                   help="named shapes: " + ", ".join(f"{k} (B{b} T{t} H{h})"
                                                     for k, (b, t, h) in SHAPES.items()))
    p.add_argument("--shape", type=_shape, action="append", default=[], metavar="B,T,H",
                   help="a custom shape (repeatable); input size = H")
    p.add_argument("--cells", type=_csv(CELLS, "cell"),
                   help=f"{','.join(CELLS)} (default: {','.join(DEFAULT_CELLS)})")
    p.add_argument("--dtypes", type=_csv(tuple(DTYPES), "dtype"),
                   help="fp32,fp16,bf16 (default: all; quick: fp16,bf16; CPU: fp32)")
    p.add_argument("--paths", type=_paths_arg,
                   help="fused_rnn paths or none: " + "; ".join(
                       f"{n}{'' if p.default else ' (not by default)'}: {p.doc}"
                       for n, p in PATHS.items()) + " (default: each path not marked 'not by default')")
    p.add_argument("--baselines", type=_csv(BASELINES, "baseline", none_ok=True),
                   help="cudnn,reference,compile or none (default: all on GPU, compile at "
                        "S2 only; --quick and CPU: cudnn,reference; on the CPU cudnn means "
                        "torch.nn)")
    p.add_argument("--modes", type=_csv(MODES, "mode"), help="fwd,fwd+bwd (default: both)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA if available, else the CPU mode")
    p.add_argument("--out", type=_out_dir,
                   help="output folder (default: bench/out; with --render: the JSON's folder)")
    p.add_argument("--no-plot", action="store_true", help="skip bench.png")
    p.add_argument("--time-limit", type=_positive_float, metavar="S",
                   help="stop starting new measurements after S seconds; the rest are "
                        "marked skipped")
    p.add_argument("--warmup", type=_positive_int, metavar="MS", help="do_bench warmup (ms)")
    p.add_argument("--rep", type=_positive_int, metavar="MS", help="do_bench rep (ms)")
    p.add_argument("--slow-ms", type=_positive_float, default=50.0,
                   help="a call slower than this is timed by wall clock, not do_bench (50)")
    p.add_argument("--slow-budget", type=_positive_float, metavar="S",
                   help="seconds of calls per slow measurement (GPU: 5, quick 3; CPU 0.5)")
    p.add_argument("--render", metavar="JSON",
                   help="re-render table, targets and plot from a saved bench.json; runs nothing")
    return p


def _progress_factory(total: int, stream=None):
    stream = stream or sys.stderr
    counter = {"i": 0}

    def start(label: str):
        counter["i"] += 1
        stream.write(f"[{counter['i']}/{total}] {label} ... ")
        stream.flush()

        def done(result: str):
            stream.write(result + "\n")
            stream.flush()

        return done

    return start


def _render_only(path: str, args, parser) -> int:
    try:  # rendered before anything is written: a bad file leaves no partial output
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data["targets"] = evaluate_targets(data["results"])
        text = render_markdown(data)
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:
        parser.error(f"--render {path}: not a readable bench.json ({_short(e)})")
    out = args.out or os.path.dirname(os.path.abspath(path))
    for msg in write_outputs(data, out, plot=not args.no_plot):
        print(msg, file=sys.stderr)
    print(text)
    return 0


def _why_nothing(data: dict) -> str:
    """One line on why a run measured nothing: how many cases failed or were skipped, and the
    first reason of each."""
    recs = data["results"]
    parts = [data["interrupted"]] if data.get("interrupted") else []
    for status, verb in (("error", "failed"), ("skipped", "skipped")):
        rs = [r for r in recs if r["status"] == status]
        if rs:
            r = rs[0]
            why = r["notes"][-1] if r["notes"] else status
            parts.append(f"{len(rs)} case{'s' * (len(rs) != 1)} {verb} (first: {r['cell']} "
                         f"{r['shape']} {r['dtype']} {r['method']}: {why})")
    n_na = sum(r["status"] == "n/a" for r in recs)
    if n_na:
        parts.append(f"{n_na} not applicable")
    return "; ".join(parts) or "no case ran"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.render:
        if not os.path.isfile(args.render):
            parser.error(f"--render: no such file {args.render!r}")
        return _render_only(args.render, args, parser)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")

    args.out = args.out or "bench/out"
    try:  # now, not after the first case: a folder that cannot be made is a usage error
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: {e.strerror or e}")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    shapes = [(n, SHAPES[n]) for n in (args.shapes or [])] + list(args.shape)
    if not cuda:
        mode = "CPU mode"
        print("no CUDA GPU" + (" used (--device cpu)" if torch.cuda.is_available() else
                               " (torch.cuda.is_available() is False)") +
              ": CPU mode — wall-clock medians (time.perf_counter), the reference loop and "
              "torch.nn on the CPU, Triton paths only under TRITON_INTERPRET=1. These numbers "
              "say nothing about GPU speed.", file=sys.stderr)
        shapes = shapes or [CPU_SHAPE]
        dtypes = args.dtypes or ["fp32"]
        baselines = args.baselines if args.baselines is not None else ["cudnn", "reference"]
        base_dtype = "fp32"
    else:
        mode = "GPU quick" if args.quick else "GPU full"
        shapes = shapes or [(n, SHAPES[n]) for n in (("S1", "S2") if args.quick else SHAPES)]
        dtypes = args.dtypes or (["fp16", "bf16"] if args.quick else list(DTYPES))
        # --quick leaves torch.compile out (its compile alone outlasts a quick run's budget)
        baselines = args.baselines if args.baselines is not None else (
            ["cudnn", "reference"] if args.quick else list(BASELINES))
        base_dtype = "fp16"
    s = Settings(
        device=device, quick=args.quick,
        warmup_ms=args.warmup or (10 if args.quick else 25),
        rep_ms=args.rep or (30 if args.quick else 100),
        slow_ms=args.slow_ms,
        slow_budget_s=args.slow_budget or ((3.0 if args.quick else 5.0) if cuda else 0.5),
        time_limit_s=args.time_limit, base_dtype=base_dtype,
        min_reps=2 if cuda else 3, max_reps=10 if cuda else 25,
    )
    cells = args.cells or list(DEFAULT_CELLS)
    paths = args.paths if args.paths is not None else [n for n, p in PATHS.items() if p.default]
    modes = args.modes or list(MODES)
    plan = make_plan(cells, shapes, dtypes, paths, baselines, modes, s)
    if not any(c.modes for c in plan):
        parser.error("nothing to run: no path and no baseline selected")
    data = {
        "schema": 1,
        "machine": machine_info(device),
        "config": {
            "mode": mode, "quick": args.quick, "cells": cells,
            "shapes": {n: list(v) for n, v in shapes}, "dtypes": dtypes, "paths": paths,
            "baselines": baselines, "modes": modes, "base_dtype": base_dtype,
            "seed_dtype": SEED_DTYPE, "warmup_ms": s.warmup_ms, "rep_ms": s.rep_ms,
            "slow_ms": s.slow_ms, "slow_budget_s": s.slow_budget_s,
            "time_limit_s": s.time_limit_s, "fwd_mode": "torch.no_grad()",
            "cpu_threads": None if cuda else 1,
            "argv": list(argv) if argv is not None else sys.argv[1:],
        },
        "results": [],
        "targets": [],
        "interrupted": None,
    }
    total = sum(len(c.modes) for c in plan if not c.na)
    print(f"{mode}: {len(plan)} cases, {total} measurements; out: {args.out}", file=sys.stderr)
    progress = _progress_factory(total)

    def on_term(signum, frame):
        raise _Interrupted(f"signal {signum}")

    old = None
    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: no handler, a SIGTERM just ends the process
        pass
    s.deadline = None if s.time_limit_s is None else time.perf_counter() + s.time_limit_s
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    if not cuda:  # one thread: OpenMP spin-waits make CPU timings erratic on a shared machine
        torch.set_num_threads(1)
    try:
        for i, c in enumerate(plan):
            data["results"].append(run_case(c, s, progress))
            if i + 1 < len(plan):  # a sweep cut short keeps what it measured
                write_outputs(data, args.out, plot=False)
    except (KeyboardInterrupt, _Interrupted) as e:
        if getattr(e, "record", None) is not None:
            data["results"].append(e.record)
        data["interrupted"] = f"interrupted ({e or 'Ctrl-C'}) after {len(data['results'])} cases"
        print(f"\n{data['interrupted']}: writing what was measured", file=sys.stderr)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        torch.set_num_threads(threads)
    data["elapsed_s"] = round(time.perf_counter() - t_start, 2)
    data["targets"] = evaluate_targets(data["results"])
    for msg in write_outputs(data, args.out, plot=not args.no_plot):
        print(msg, file=sys.stderr)
    print(render_markdown(data))
    print(f"wrote {os.path.join(args.out, 'bench.json')}, bench.md"
          + ("" if args.no_plot else ", bench.png") + f" ({data['elapsed_s']} s)", file=sys.stderr)
    if not any(r["fwd_ms"] is not None or r["fwdbwd_ms"] is not None for r in data["results"]):
        print(f"fused-rnn bench: nothing was measured: {_why_nothing(data)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
