"""The `fused-rnn` command (also `python -m fused_rnn`): check, bench, demo.

Subcommands import their modules lazily: nothing here imports triton, so `check` can still turn
on the Triton interpreter (TRITON_INTERPRET=1) by re-running itself when there is no GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
from typing import List, Optional, Sequence

_REEXEC_MARK = "_FUSED_RNN_CHECK_REEXEC"  # set in the re-executed child, to never loop


def _csv(choices: Sequence[str], what: str):
    """An argparse type: a comma-separated subset of ``choices`` (or "all")."""

    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {what} list")
        if items == ["all"]:
            return list(choices)
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad))} "
                f"(choose from {', '.join(choices)}, or all)"
            )
        return list(dict.fromkeys(items))  # keep order, drop repeats

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (also the bench's)."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


DEMO_OUT = os.path.join(tempfile.gettempdir(), "fused-rnn-demo")


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 (float() alone takes nan, inf and negatives);
    also the bench's."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def _threads(text: str) -> int:
    v = positive_int(text)
    cores = os.cpu_count() or 1
    if v > cores:
        raise argparse.ArgumentTypeError(f"at most {cores} (this machine's CPU cores), got {v}")
    return v


def out_dir(text: str) -> str:
    """An argparse type for --out (the demo's and the bench's): a folder, or a path where one
    can be made (no file on it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    path = probe = os.path.abspath(text)
    while not os.path.exists(probe):  # the nearest existing ancestor must be a folder
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        what = "an existing file" if probe == path else f"under the file {probe}"
        raise argparse.ArgumentTypeError(f"{text!r} is {what}, not a folder")
    return text


def _seed(text: str) -> int:
    v = _int(text)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {v}")
    return v


def _device(text: str) -> str:
    """An argparse type for the demo's --device: auto, cpu, cuda or cuda:N."""
    t = text.strip().lower()
    if t in ("auto", "cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"{text!r} is not auto, cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .check import CELL_HELP, CELLS, CPU_DTYPES, CUDA_DTYPES, DTYPES
    from .demo import FULL, QUICK

    p = argparse.ArgumentParser(
        prog="fused-rnn",
        description="fused_rnn: Triton kernels for the tanh/ReLU RNN, LSTM and layer-norm LSTM.",
    )
    p.add_argument("--version", action="version", version=f"fused_rnn {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{check,bench,demo}")
    sub.required = True

    c = sub.add_parser(
        "check",
        help="correctness sweep of every kernel against the fp64 reference path",
        description=(
            "Run every kernel (forward and backward) against the reference path in fp64 over "
            "cells x dtypes x shapes, on fresh random inputs, with kernel outputs poisoned "
            "with NaN; print a table of relative errors and exit 1 if any case fails. Runs on "
            "a CUDA GPU, or on the CPU through the Triton interpreter: without a GPU, the "
            "command re-runs itself with TRITON_INTERPRET=1."
        ),
        epilog=(
            "cells: " + ", ".join(f"{k} ({v})" for k, v in CELL_HELP.items()) + ". "
            f"dtypes: default {','.join(CUDA_DTYPES)} on CUDA, {','.join(CPU_DTYPES)} on the "
            "CPU (bf16/fp16 are CUDA only)."
        ),
    )
    c.add_argument("--quick", action="store_true",
                   help="small shapes only (about 20 s on a 2-core CPU); without it, medium "
                        "shapes on the CPU (about 2 minutes) and large ones too on a GPU")
    c.add_argument("--cells", type=_csv(CELLS, "cell"), default=list(CELLS),
                   help=f"comma-separated cells to check (default: all = {','.join(CELLS)})")
    c.add_argument("--dtypes", type=_csv(tuple(DTYPES), "dtype"), default=None,
                   help="comma-separated dtypes (default: all the device supports)")
    c.add_argument("--seed", type=_seed, default=None,
                   help="seed for the random inputs (default: a fresh one, printed)")
    c.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA if available (and TRITON_INTERPRET unset), else the CPU "
                        "through the Triton interpreter")
    c.add_argument("--tf32", choices=("auto", "on", "off"), default="auto",
                   help="fp32 on CUDA: on = set torch.backends.cuda.matmul.allow_tf32 (the "
                        "kernels follow it) and use the TF32 threshold 5e-3, off = IEEE fp32 and "
                        "1e-4; auto = leave allow_tf32 as it is (torch's default: off)")
    c.add_argument("--paths", type=_csv(("auto", "step", "graph", "persistent", "adaptive"), "path"), default=["auto"],
                   help="comma-separated time-loop paths to check, one table each: auto (the "
                        "default policy), step, graph (CUDA), persistent, adaptive (persistent, "
                        "else graph, else step); a case a path does not take is SKIP (default: auto)")
    c.add_argument("-v", "--verbose", action="store_true",
                   help="print every tensor's error and the traceback of failed cases")
    c.add_argument("--_inject-error", dest="inject_error", action="store_true",
                   help=argparse.SUPPRESS)  # internal: corrupt the kernel output (tests the sweep)

    # Listed for --help only: main() hands everything after "bench" to fused_rnn.bench.main.
    sub.add_parser("bench", add_help=False,
                   help="benchmarks against cuDNN (fused_rnn.bench; `fused-rnn bench --help`)")

    d = sub.add_parser(
        "demo",
        help="train a small character-level LSTM language model with fused_rnn and torch.nn",
        description=(
            "Train a character-level LSTM language model on Macbeth (shipped with the package) "
            "twice from the same initial weights and batches: with fused_rnn.LSTM and with "
            "torch.nn.LSTM on the same device. Prints a progress bar, the tokens per second of "
            "each, and writes the loss curves (loss.png, if matplotlib is importable) and "
            "results.json to --out."
        ),
    )
    d.add_argument("--quick", action="store_true",
                   help="a small model and few steps (under two minutes on a CPU)")
    d.add_argument("--steps", type=positive_int, default=None,
                   help=f"training steps per model (default: {QUICK['steps']} with --quick, "
                        f"else {FULL['steps']})")
    d.add_argument("--device", type=_device, default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    d.add_argument("--out", type=out_dir, default=DEMO_OUT, metavar="DIR",
                   help=f"where loss.png and results.json go (default: {DEMO_OUT}, outside any checkout)")
    d.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                   help="fused_rnn backend (auto: Triton kernels on CUDA, reference path on CPU)")
    d.add_argument("--hidden-size", type=positive_int, default=None,
                   help=f"LSTM hidden size (default: {QUICK['hidden_size']} with --quick, "
                        f"else {FULL['hidden_size']})")
    d.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"sequences per batch (default: {QUICK['batch_size']} with --quick, "
                        f"else {FULL['batch_size']})")
    d.add_argument("--seq-len", type=positive_int, default=None,
                   help=f"characters per sequence (default: {QUICK['seq_len']} with --quick, "
                        f"else {FULL['seq_len']})")
    d.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads for torch (default on the CPU: 1, since the small per-step "
                        "matmuls gain nothing from more and lose much on a busy machine)")
    d.add_argument("--seed", type=_seed, default=0, help="seed for weights and batches (default 0)")
    p.subcommand_parsers = {"check": c, "demo": d}  # for errors that argparse cannot see
    return p


def _bench(argv: List[str]) -> int:
    if importlib.util.find_spec("fused_rnn.bench") is None:
        print("fused-rnn bench: fused_rnn.bench is not part of this install", file=sys.stderr)
        return 2
    from . import bench

    rc = bench.main(argv)
    return int(rc or 0)


def _demo(args, demo_parser) -> int:
    import torch

    from ._backend import resolve_backend

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            demo_parser.error(f"--device {args.device}: no CUDA GPU is visible to torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            demo_parser.error(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s)")
    try:
        resolve_backend(args.backend, torch.empty(0, device=device))
    except RuntimeError as e:
        demo_parser.error(f"--backend {args.backend}: {e}")
    from . import demo

    try:
        return demo.main(args, device)
    except demo.UsageError as e:
        demo_parser.error(str(e))
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        lines = str(e).strip().splitlines()
        msg = lines[0][:200] if lines else type(e).__name__
        if not (isinstance(e, (MemoryError, torch.OutOfMemoryError))
                or "can't allocate memory" in msg or "out of memory" in msg.lower()):
            raise
        print(f"fused-rnn demo: out of memory on {device} ({msg}); try a smaller --hidden-size, "
              "--batch-size or --seq-len", file=sys.stderr)
        return 1


def _check(args, argv: List[str], parser, may_reexec: bool) -> int:
    from ._backend import interpreter_broken, interpreter_on

    check_parser = parser.subcommand_parsers["check"]
    if importlib.util.find_spec("triton") is None:
        print("fused-rnn check: the triton package is not importable; the check runs the Triton "
              "kernels (on a CUDA GPU, or on the CPU through the Triton interpreter)",
              file=sys.stderr)
        return 2
    import torch

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda:
        check_parser.error("--device cuda: no CUDA GPU is visible to torch")
    use_cuda = args.device == "cuda" or (
        args.device == "auto" and has_cuda and not interpreter_on()
    )
    if not use_cuda and not interpreter_on():
        # CPU tensors need the Triton interpreter, and TRITON_INTERPRET is read when the kernels
        # are decorated: it has to be in the environment before triton is imported.
        if not may_reexec or os.environ.get(_REEXEC_MARK) or "triton" in sys.modules:
            print("fused-rnn check: the CPU lane runs the kernels through the Triton "
                  "interpreter, and TRITON_INTERPRET is not set; run it as "
                  "`TRITON_INTERPRET=1 fused-rnn check ...`", file=sys.stderr)
            return 2
        why = "no CUDA GPU" if not has_cuda else "--device cpu"
        print(f"fused-rnn check: {why}: re-running under the Triton interpreter on the CPU "
              "(TRITON_INTERPRET=1)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        env = dict(os.environ, TRITON_INTERPRET="1", **{_REEXEC_MARK: "1"})
        os.execve(sys.executable, [sys.executable, "-m", "fused_rnn", *argv], env)
    device = torch.device("cuda" if use_cuda else "cpu")

    from . import check

    dtypes = args.dtypes
    if dtypes is None:
        dtypes = list(check.CUDA_DTYPES if use_cuda else check.CPU_DTYPES)
    elif not use_cuda:
        skipped = [d for d in dtypes if d in check.CUDA_ONLY_DTYPES]
        dtypes = [d for d in dtypes if d not in check.CUDA_ONLY_DTYPES]
        if not dtypes:
            check_parser.error(f"--dtypes {','.join(skipped)}: bf16 and fp16 run only on CUDA; "
                               "on the CPU the check covers fp32 and fp64")
        if skipped:
            print(f"note: skipping {', '.join(skipped)} (CUDA only)", file=sys.stderr)

    broken = interpreter_broken() if interpreter_on() else None
    if broken:  # every case would fail in the interpreter, not in the kernels: say why instead
        print(f"fused-rnn check: the kernels run through the Triton interpreter here, and {broken}",
              file=sys.stderr)
        return 2
    tf32 = None if args.tf32 == "auto" else args.tf32 == "on"
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    return check.main(args.cells, dtypes, args.quick, seed, device, tf32,
                      verbose=args.verbose, inject=args.inject_error, paths=args.paths)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `fused-rnn` console script and of `python -m fused_rnn`.

    Called with ``argv=None`` (a real command line), `check` may re-execute the process to turn
    the Triton interpreter on; called with an explicit ``argv`` (in-process use), it never does.
    """
    may_reexec = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args, argv, parser, may_reexec)
    if args.command == "demo":
        return _demo(args, parser.subcommand_parsers["demo"])
    parser.error(f"unknown command {args.command!r}")
    return 2
