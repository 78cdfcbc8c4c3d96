"""The benchmark's cases: the problem sizes, the random problem a row runs on, the registry of
fused_rnn paths, and the plan of which rows run in which order."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

SHAPES: Dict[str, Tuple[int, int, int]] = {  # name -> (B, T, H); input size = H
    "S1": (16, 1024, 256),
    "S2": (64, 512, 512),
    "S3": (256, 256, 1024),
    "S4": (16, 1024, 768),
}
CPU_SHAPE = ("tiny", (4, 16, 32))  # the CPU mode's default: the reference loop takes ms, not s
CELLS = ("lstm", "lnlstm", "rnn", "lstm_proj", "gru")
DEFAULT_CELLS = ("lstm", "lnlstm", "rnn")  # lstm_proj and gru (no speed target) only when asked for
CELL_LABEL = {"lstm": "LSTM", "lnlstm": "LN-LSTM", "rnn": "tanh RNN", "lstm_proj": "LSTM, proj H/2", "gru": "GRU"}
LSTM_CELLS = ("lstm", "lnlstm", "lstm_proj")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
MODE_KEY = {"fwd": "fwd_ms", "fwd+bwd": "fwdbwd_ms"}
BASELINES = ("cudnn", "reference", "compile")
SEED_DTYPE = "fp32"  # torch.compile runs in the seed's dtype; the reference loop in each dtype swept
KIND_ORDER = {"fused": 0, "nn": 1, "reference": 2, "compile": 3}


def short_error(e: BaseException) -> str:
    """An exception in one line: its type and the first 160 characters of its first line."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


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
    G = 4 * H if cell in LSTM_CELLS else (3 * H if cell == "gru" else H)
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


# ------------------------------------------------------------------ the fused_rnn paths' registry
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


PATHS: Dict[str, Path] = {}  # filled by fused_rnn.bench.paths (imported with the package)


def register_path(name: str, build: Build,
                  available: Optional[Callable[[torch.device], Optional[str]]] = None,
                  doc: str = "", cells: Sequence[str] = CELLS, default: bool = True) -> Path:
    """Add (or replace) a fused_rnn path under ``name``; ``--paths`` selects it by that name."""
    if not name or "," in name or name == "none":
        raise ValueError(f"path name must be non-empty, not 'none', without commas: {name!r}")
    path = Path(name, build, available or (lambda device: None), doc, tuple(cells), default)
    PATHS[name] = path
    return path


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
