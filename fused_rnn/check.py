"""`fused-rnn check`: the correctness sweep of every kernel against the fp64 reference path.

Each case is one cell (LSTM, layer-norm LSTM, LSTM with projections, tanh RNN, ReLU RNN, GRU) × one
storage dtype × one shape. Inputs are drawn fresh each run from a printed seed, cast to the
dtype, and run through the Triton path (``backend="triton"``); the oracle is the reference path
run in fp64 on the same (already rounded) inputs. Forward (out, h_n, c_n) and backward (the
gradients of x, h0, c0, the weights, both biases and the LayerNorm parameters, driven by
``(out·dout).sum() + (h_n·dh_n).sum() + (c_n·dc_n).sum()`` so the initial- and final-state paths
are covered) are compared as ``‖a − b‖ / ‖b‖`` against a per-dtype threshold.

Poisoning: while the kernel path runs (forward and backward), the kernels' poison option is
on (``kernels.config.using(poison=True)``), so the launchers allocate every buffer a kernel must
fill with NaN; and, for any buffer allocated elsewhere, every tensor PyTorch allocates without
initialising it (``torch.empty`` and friends) is NaN too, through PyTorch's own switch
(``torch.use_deterministic_algorithms(True, warn_only=True)`` with
``torch.utils.deterministic.fill_uninitialized_memory = True``). An element a kernel forgets to
write stays NaN, and a NaN error fails the case.

Fallbacks: the functional entry points quietly run the reference path for a problem the kernels
do not take. A case where that happened would compare the reference with itself, so the sweep
counts reference calls during the kernel path and reports such a case as SKIP, never as ok.

This module runs no re-exec and reads no command line: ``fused_rnn.cli`` does both. The Triton
path needs a CUDA GPU, or CPU tensors with TRITON_INTERPRET=1 set before Python started.
"""
from __future__ import annotations

import contextlib
import math
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import torch

from .kernels import config

CELLS = ("lstm", "lnlstm", "lstm_proj", "rnn_tanh", "rnn_relu", "gru")
LSTM_CELLS = ("lstm", "lnlstm", "lstm_proj")
CELL_HELP = {
    "lstm": "LSTM",
    "lnlstm": "layer-norm LSTM",
    "lstm_proj": "LSTM with projections (nn.LSTM's proj_size; here H // 2, at least 1)",
    "rnn_tanh": "tanh RNN",
    "rnn_relu": "ReLU RNN",
    "gru": "GRU",
}
DTYPES = {
    "fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}
CUDA_ONLY_DTYPES = ("bf16", "fp16")  # the interpreter lane is fp32/fp64 (numpy has no bf16)
CPU_DTYPES = ("fp64", "fp32")
CUDA_DTYPES = ("fp32", "bf16", "fp16", "fp64")

# ‖kernel − ref‖ / ‖ref‖ against the reference run in fp64 on the same rounded inputs.
THRESHOLDS_CPU = {"fp64": 1e-10, "fp32": 1e-5}  # Triton interpreter: numpy math, no TF32
THRESHOLDS_CUDA = {"fp64": 1e-10, "fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}
FP32_TF32_THRESHOLD = 5e-3


@dataclass(frozen=True)
class Shape:
    T: int
    B: int
    I: int  # noqa: E741 (the dimension letter of the input features)
    H: int
    var_lengths: bool = False

    @property
    def id(self) -> str:
        return f"T{self.T}-B{self.B}-I{self.I}-H{self.H}" + ("-var" if self.var_lengths else "")


# Odd sizes on purpose: T = 1, H not a power of two, B not a multiple of 16, variable lengths
# (one sequence runs to T, and with B >= 3 one has length 0). H = 70 puts the fp64 layer-norm
# LSTM on its unfused path (fused only up to kernels.config.LN_FUSED_MAX_H_FP64 = 64).
QUICK_SHAPES = (
    Shape(1, 1, 3, 5),
    Shape(7, 3, 5, 37, var_lengths=True),
    Shape(5, 17, 8, 16),
    Shape(3, 4, 6, 70, var_lengths=True),
)
# The full sweep adds larger sizes: several blocks in B and in H, H = 257 past the fused
# layer-norm limit (kernels.config.LN_FUSED_MAX_H = 128; H = 100 and 128 below it), longer
# sequences. The interpreter runs a program at a time in numpy, so the CPU gets medium sizes
# (the full CPU sweep takes about two minutes) and the GPU gets the large ones too.
FULL_SHAPES_CPU = QUICK_SHAPES + (
    Shape(16, 16, 32, 64, var_lengths=True),
    Shape(9, 5, 40, 100, var_lengths=True),
    Shape(4, 3, 24, 257),
    Shape(33, 6, 16, 48, var_lengths=True),
    Shape(2, 40, 8, 24),
)
FULL_SHAPES_CUDA = FULL_SHAPES_CPU + (
    Shape(33, 16, 64, 100, var_lengths=True),
    Shape(64, 64, 128, 256),
    Shape(16, 5, 300, 257),
    Shape(128, 33, 64, 128, var_lengths=True),
    Shape(32, 130, 256, 512, var_lengths=True),
)


def shapes_for(quick: bool, device: torch.device):
    if quick:
        return QUICK_SHAPES
    return FULL_SHAPES_CUDA if device.type == "cuda" else FULL_SHAPES_CPU


@dataclass(frozen=True)
class Case:
    cell: str
    dtype: str
    shape: Shape

    @property
    def id(self) -> str:
        return f"{self.cell}-{self.dtype}-{self.shape.id}"


# What the table shows: forward outputs, then gradients (several tensors share a column).
COLUMNS = (
    ("out", ("out",)),
    ("h_n", ("h_n",)),
    ("c_n", ("c_n",)),
    ("dx", ("x",)),
    ("dh0", ("h0",)),
    ("dc0", ("c0",)),
    ("dW", ("w_ih", "w_hh", "w_hr")),
    ("db", ("b_ih", "b_hh")),
    ("dLN", ("ln_gate_w", "ln_gate_b", "ln_cell_w", "ln_cell_b")),
)


@dataclass
class Result:
    case: Case
    threshold: float
    errors: Dict[str, float] = field(default_factory=dict)  # tensor name -> relative error
    error: Optional[str] = None  # an exception or a missing output / gradient
    tb: Optional[str] = None  # the exception's traceback
    skipped: Optional[str] = None  # why the kernels did not run this case (reference fallback)
    seconds: float = 0.0
    path: str = "auto"  # the time-loop path it ran on (fused_rnn.use_path)

    @property
    def ok(self) -> bool:
        """Passed, or skipped: only a failure makes the command exit non-zero."""
        return self.skipped is not None or self.passed

    @property
    def passed(self) -> bool:
        # `e <= thr` is False for NaN, so a poisoned element left unwritten fails.
        return (self.skipped is None and self.error is None
                and all(e <= self.threshold for e in self.errors.values()))

    def worst(self) -> float:
        vals = list(self.errors.values())
        if not vals:
            return math.nan
        if any(math.isnan(v) for v in vals):
            return math.nan
        return max(vals)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64 (‖a − b‖ when b is all zero)."""
    a = a.detach().double()
    b = b.detach().double().to(a.device)
    diff = float((a - b).norm())
    denom = float(b.norm())
    return diff if denom == 0.0 else diff / denom


def thresholds(device: torch.device, tf32: bool) -> Dict[str, float]:
    if device.type != "cuda":
        return dict(THRESHOLDS_CPU)
    th = dict(THRESHOLDS_CUDA)
    if tf32:
        th["fp32"] = FP32_TF32_THRESHOLD
    return th


def make_cases(cells: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Shape]) -> List[Case]:
    return [Case(c, d, s) for c in cells for d in dtypes for s in shapes]


def case_seed(seed: int, case: Case) -> int:
    """Each case's own stream, so filtering cells or dtypes does not change a case's inputs."""
    return (seed * 1_000_003 + zlib.crc32(case.id.encode())) % (2**63)


# ------------------------------------------------------------------------------------------
# Inputs and the two paths


def proj_size(H: int) -> int:
    """The projection width of the lstm_proj cases: H // 2, at least 1 (nn.LSTM wants P < H)."""
    return max(1, H // 2)


def make_inputs(case: Case, seed: int):
    """fp64 CPU tensors: leaves (name -> tensor), upstream grads (name -> tensor), lengths."""
    s = case.shape
    g = torch.Generator().manual_seed(case_seed(seed, case))
    lstm = case.cell in LSTM_CELLS
    G = 4 * s.H if lstm else (3 * s.H if case.cell == "gru" else s.H)
    P = proj_size(s.H) if case.cell == "lstm_proj" else s.H  # the width of h
    k = 1.0 / math.sqrt(s.H)  # torch.nn's init range

    def U(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * k

    def N(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    leaves = {
        "x": N(s.T, s.B, s.I),
        "h0": N(s.B, P, scale=0.5),
        "w_ih": U(G, s.I),
        "w_hh": U(G, P),
        "b_ih": U(G),
        "b_hh": U(G),
    }
    if lstm:
        leaves["c0"] = N(s.B, s.H, scale=0.5)
    if case.cell == "lstm_proj":
        leaves["w_hr"] = U(P, s.H)
    if case.cell == "lnlstm":
        leaves["ln_gate_w"] = 1.0 + N(G, scale=0.1)
        leaves["ln_gate_b"] = N(G, scale=0.1)
        leaves["ln_cell_w"] = 1.0 + N(s.H, scale=0.1)
        leaves["ln_cell_b"] = N(s.H, scale=0.1)
    douts = {"out": N(s.T, s.B, P), "h_n": N(s.B, P)}
    if lstm:
        douts["c_n"] = N(s.B, s.H)
    lengths = None
    if s.var_lengths:
        lengths = torch.randint(1, s.T + 1, (s.B,), generator=g, dtype=torch.int64)
        lengths[0] = s.T  # the longest runs to the end, as after pad_packed_sequence
        if s.B >= 3:
            lengths[-1] = 0  # an empty sequence: its state passes through unchanged
    return leaves, douts, lengths


def run_path(cell: str, p: Dict[str, torch.Tensor], lengths,
             backend: str) -> Dict[str, torch.Tensor]:
    """One forward through the functional entry point: name -> output tensor."""
    from .gru import gru_sequence
    from .lstm import lstm_sequence
    from .rnn import rnn_sequence

    if cell == "gru":
        out, h_n = gru_sequence(p["x"], p["h0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"], lengths=lengths,
                                backend=backend)
        return {"out": out, "h_n": h_n}
    if cell in LSTM_CELLS:
        ln = None
        if cell == "lnlstm":
            ln = (p["ln_gate_w"], p["ln_gate_b"], p["ln_cell_w"], p["ln_cell_b"])
        out, h_n, c_n = lstm_sequence(
            p["x"], p["h0"], p["c0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"],
            ln=ln, lengths=lengths, backend=backend, w_hr=p.get("w_hr"),
        )
        return {"out": out, "h_n": h_n, "c_n": c_n}
    out, h_n = rnn_sequence(
        p["x"], p["h0"], p["w_ih"], p["w_hh"], p["b_ih"], p["b_hh"],
        lengths=lengths, nonlinearity=cell.split("_", 1)[1], backend=backend,
    )
    return {"out": out, "h_n": h_n}


def triton_path(cell, p, lengths):
    """The path under test: the Triton kernels behind the functional entry points."""
    return run_path(cell, p, lengths, "triton")


def reference_path(cell, p, lengths):
    return run_path(cell, p, lengths, "reference")


@contextlib.contextmanager
def poisoned_allocations():
    """NaN in every buffer a kernel should fill: the kernels' poison option, and every
    uninitialised torch allocation (torch.empty, new_empty, empty_like) for the rest."""
    import torch.utils.deterministic as det

    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        det.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        with config.using(poison=True), warnings.catch_warnings():
            # warn_only mode warns about ops (cuBLAS, scatter_add, ...) with no deterministic
            # implementation; only the NaN fill is wanted here.
            warnings.filterwarnings("ignore", message=".*deterministic.*", category=UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        det.fill_uninitialized_memory = prev[2]


@contextlib.contextmanager
def count_reference_calls(counter: List[int]):
    """Count the reference-path calls made by fused_rnn.lstm / rnn / gru meanwhile."""
    from . import gru as gru_mod
    from . import lstm as lstm_mod
    from . import rnn as rnn_mod

    patched = []
    for mod, name in ((lstm_mod, "lstm_sequence_ref"), (rnn_mod, "rnn_sequence_ref"), (gru_mod, "gru_sequence_ref")):
        fn = getattr(mod, name, None)
        if fn is None:
            continue

        def counting(*a, _fn=fn, **k):
            counter[0] += 1
            return _fn(*a, **k)

        setattr(mod, name, counting)
        patched.append((mod, name, fn))
    try:
        yield
    finally:
        for mod, name, fn in patched:
            setattr(mod, name, fn)


def _forward_backward(fn, cell, leaves, douts, lengths):
    outs = fn(cell, leaves, lengths)
    missing = [n for n in douts if n not in outs or outs[n] is None]
    if missing:
        raise RuntimeError(f"missing outputs {missing}")
    for n, d in douts.items():
        if tuple(outs[n].shape) != tuple(d.shape):
            raise RuntimeError(f"{n} has shape {tuple(outs[n].shape)}, expected {tuple(d.shape)}")
    # d(loss)/d(out) is exactly dout in any dtype, so the loss's own rounding does not matter.
    loss = sum((outs[n] * d).sum() for n, d in douts.items())
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return outs, dict(zip(names, grads))


def run_case(case: Case, seed: int, device: torch.device, threshold: float,
             kernel: Callable = triton_path, poison: bool = True,
             expect_triton: Optional[bool] = None, path: str = "auto") -> Result:
    """One case. ``expect_triton`` (default: ``kernel is triton_path``): a case in which the
    kernel path called the reference path is reported as skipped. ``path``: the time-loop path
    the kernels run on (fused_rnn.use_path); a case that path does not take (it ran the step
    path instead) is reported as skipped too."""
    from . import _paths

    if expect_triton is None:
        expect_triton = kernel is triton_path
    res = Result(case, threshold, path=path)
    ref_calls = [0]
    t0 = time.perf_counter()
    try:
        dtype = DTYPES[case.dtype]
        leaves64, douts64, lengths = make_inputs(case, seed)
        if lengths is not None:
            lengths = lengths.to(device)
        # The kernel's inputs in the storage dtype; the oracle's are the same values in fp64.
        k_leaves = {n: t.to(device=device, dtype=dtype).requires_grad_()
                    for n, t in leaves64.items()}
        k_douts = {n: t.to(device=device, dtype=dtype) for n, t in douts64.items()}
        r_leaves = {n: t.detach().double().requires_grad_() for n, t in k_leaves.items()}
        r_douts = {n: t.double() for n, t in k_douts.items()}

        r_outs, r_grads = _forward_backward(reference_path, case.cell, r_leaves, r_douts, lengths)
        with poisoned_allocations() if poison else contextlib.nullcontext(), \
                count_reference_calls(ref_calls), _paths.use_path(path), \
                _paths.record_resolutions() as ran, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*path not possible.*", category=RuntimeWarning)
            k_outs, k_grads = _forward_backward(kernel, case.cell, k_leaves, k_douts, lengths)
        if expect_triton and ref_calls[0]:
            res.skipped = "the kernels did not take it; the reference path ran (" + (
                _unsupported_reason(case, k_leaves) or "see the RuntimeWarning") + ")"
        elif path not in ("auto", "step", "adaptive") and any(p != path for _, p in ran):
            res.skipped = (f"the {path} path did not take it (ran "
                           + ", ".join(sorted({f"{op}: {p}" for op, p in ran if p != path})) + ")")
        if device.type == "cuda":
            torch.cuda.synchronize(device)

        for n in douts64:
            res.errors[n] = rel_err(k_outs[n], r_outs[n])
        missing = []
        for n in leaves64:
            if k_grads[n] is None:
                missing.append(n)
            elif tuple(k_grads[n].shape) != tuple(r_grads[n].shape):
                missing.append(f"{n} (shape {tuple(k_grads[n].shape)})")
            else:
                res.errors[n] = rel_err(k_grads[n], r_grads[n])
        if missing:
            res.error = "no gradient for " + ", ".join(missing)
    except Exception as e:  # reported as a failed row (and the traceback with --verbose)
        res.error = f"{type(e).__name__}: {e}"
        res.tb = traceback.format_exc()
    res.seconds = time.perf_counter() - t0
    return res


def _unsupported_reason(case: Case, leaves) -> Optional[str]:
    """The kernels' own word on why they do not take this problem, where they offer one."""
    try:
        from .kernels import gru, lstm, rnn

        if case.cell == "gru":
            return gru.unsupported(leaves["x"], leaves["w_hh"])
        if case.cell in LSTM_CELLS:
            ln = None
            if case.cell == "lnlstm":
                ln = tuple(leaves[n] for n in ("ln_gate_w", "ln_gate_b", "ln_cell_w", "ln_cell_b"))
            return lstm.unsupported(leaves["x"], leaves["w_hh"], ln)
        return rnn.unsupported(leaves["x"], leaves["w_hh"])
    except Exception:  # only a better message is lost
        return None


# ------------------------------------------------------------------------------------------
# The table


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    return f"{v:.1e}"


def _column_value(res: Result, names) -> Optional[float]:
    vals = [res.errors[n] for n in names if n in res.errors]
    if not vals:
        return None
    if any(math.isnan(v) for v in vals):
        return math.nan
    return max(vals)


def table_header() -> str:
    cols = " ".join(f"{c:>8}" for c, _ in COLUMNS)
    return f"{'cell':<9} {'dtype':<5} {'shape':<22} {cols} {'thresh':>7} {'time':>6}  result"


def table_row(res: Result) -> str:
    c = res.case
    cols = " ".join(f"{_fmt(_column_value(res, names)):>8}" for _, names in COLUMNS)
    status = "ok" if res.passed else ("SKIP" if res.skipped else "FAIL")
    if res.skipped:
        status += f"  {res.skipped}"
    elif res.error:
        status += f"  {res.error}"
    elif not res.passed:
        bad = [n for n, e in res.errors.items() if not (e <= res.threshold)]
        status += "  " + ", ".join(bad)
    return (f"{c.cell:<9} {c.dtype:<5} {c.shape.id:<22} {cols} {res.threshold:>7.0e} "
            f"{res.seconds:>5.1f}s  {status}")


def run_sweep(cases: Sequence[Case], seed: int, device: torch.device, thresholds: Dict[str, float],
              kernel: Callable = triton_path, poison: bool = True,
              expect_triton: Optional[bool] = None,
              out: Optional[TextIO] = None, verbose: bool = False, path: str = "auto") -> List[Result]:
    """Run every case on time-loop path ``path``, printing the table as it goes; returns the
    results."""
    import sys

    out = out or sys.stdout
    print(table_header(), file=out, flush=True)
    results = []
    for case in cases:
        res = run_case(case, seed, device, thresholds[case.dtype], kernel=kernel, poison=poison,
                       expect_triton=expect_triton, path=path)
        results.append(res)
        print(table_row(res), file=out, flush=True)
        if verbose and res.tb:
            print(res.tb, file=out, flush=True)
        if verbose and res.errors:
            detail = "  ".join(f"{n}={_fmt(e)}" for n, e in res.errors.items())
            print(f"    {detail}", file=out, flush=True)
    return results


# ------------------------------------------------------------------------------------------
# The command


def inject_error(kernel: Callable) -> Callable:
    """A broken kernel for testing the sweep itself: the last step of ``out`` is off by one."""

    def broken(cell, p, lengths):
        outs = dict(kernel(cell, p, lengths))
        o = outs["out"]
        outs["out"] = torch.cat([o[:-1], o[-1:] + 1])
        return outs

    return broken


def main(cells: Sequence[str], dtypes: Sequence[str], quick: bool, seed: int,
         device: torch.device, tf32: Optional[bool] = None, verbose: bool = False,
         inject: bool = False, out: Optional[TextIO] = None, paths: Sequence[str] = ("auto",)) -> int:
    """Print the header, the table and the summary; 0 when no case failed, else 1.

    ``paths``: the time-loop paths to sweep (fused_rnn._paths: auto, step, graph, persistent),
    one table each; a case a path does not take is SKIP.

    ``tf32`` (CUDA): None keeps torch.backends.cuda.matmul.allow_tf32 as it is; True / False
    sets it for the run. The kernels follow that switch for fp32, and so does the threshold.
    """
    import sys

    from . import __version__
    from ._backend import interpreter_on

    out = out or sys.stdout
    import triton

    shapes = shapes_for(quick, device)
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda" and tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    tf32_on = device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)
    th = thresholds(device, tf32_on)
    print(f"fused-rnn check: fused_rnn {__version__}, torch {torch.__version__}, "
          f"triton {triton.__version__}", file=out)
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
        if interpreter_on():
            where += " through the Triton interpreter (TRITON_INTERPRET=1)"
    else:
        where = "cpu through the Triton interpreter (TRITON_INTERPRET=1)"
    print(f"device: {where}", file=out)
    print(f"seed: {seed} (rerun the same inputs with --seed {seed})", file=out)
    print(f"sizes: {'--quick' if quick else 'full'} ({len(shapes)} shapes); cells: "
          f"{', '.join(cells)}; dtypes: {', '.join(dtypes)}", file=out)
    if device.type != "cuda":
        print("note: bf16 and fp16 are CUDA lanes (the interpreter lane is fp32/fp64); "
              "they are not run on the CPU", file=out)
    tf32_note = ""
    if device.type == "cuda" and "fp32" in dtypes:
        tf32_note = (" (fp32 with TF32: torch.backends.cuda.matmul.allow_tf32 is on)" if tf32_on
                     else " (fp32 in IEEE fp32: allow_tf32 is off)")
    print("thresholds, ‖kernel − ref‖/‖ref‖ against the reference path in fp64: "
          + ", ".join(f"{d} {th[d]:.0e}" for d in dtypes) + tf32_note, file=out)
    print("poison: buffers the kernels fill start as NaN (the kernels' poison option + torch "
          "fill_uninitialized_memory), so an unwritten element fails", file=out)
    print("columns: rel. error of out, h_n, c_n and of the gradients of x, h0, c0, "
          "W_ih/W_hh/W_hr (dW), b_ih/b_hh (db), LayerNorm params (dLN); '-' = not in this cell",
          file=out)
    kernel = triton_path
    if inject:
        kernel = inject_error(kernel)
        print("fault injection on (--_inject-error): the kernel's out is corrupted on purpose",
              file=out)
    print(file=out, flush=True)

    t0 = time.perf_counter()
    results = []
    try:
        for path in paths:
            if list(paths) != ["auto"]:
                print(f"path: {path}", file=out, flush=True)
            results += run_sweep(make_cases(cells, dtypes, shapes), seed, device, th, kernel=kernel,
                                 expect_triton=True, out=out, verbose=verbose, path=path)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    failed = [r for r in results if not r.ok]
    skipped = [r for r in results if r.skipped]
    passed = len(results) - len(failed) - len(skipped)
    print(f"\ncheck: {len(results)} cases, {passed} ok, {len(skipped)} SKIP, {len(failed)} FAIL "
          f"({time.perf_counter() - t0:.1f} s, seed {seed})", file=out, flush=True)
    def name(r):
        return r.case.id if list(paths) == ["auto"] else f"{r.path}:{r.case.id}"

    if skipped:
        print("skipped (the kernels did not run them): "
              + ", ".join(name(r) for r in skipped), file=out, flush=True)
    if failed:
        print("failed: " + ", ".join(name(r) for r in failed), file=out, flush=True)
    if not passed and not failed:  # every case SKIP: nothing was checked, which is no pass
        print(f"fused-rnn check: nothing was checked: the kernels took none of the "
              f"{len(results)} cases (every one SKIP)", file=sys.stderr, flush=True)
        return 1
    return 1 if failed else 0
