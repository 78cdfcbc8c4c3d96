"""`fused-rnn bench`: the arguments, the sweep over the plan (SIGTERM and --time-limit keep what
was measured), the files and the exit status (0 measured something, 1 nothing, 2 usage)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

from ..cli import out_dir, positive_float, positive_int
from .cases import (BASELINES, CELLS, CPU_SHAPE, DEFAULT_CELLS, DTYPES, MODES, PATHS, SEED_DTYPE,
                    SHAPES, Settings, make_plan, short_error)
from .report import machine_info, render_markdown, write_outputs
from .targets import evaluate_targets
from .timing import Interrupted, run_case


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
    p.add_argument("--out", type=out_dir,
                   help="output folder (default: bench/out; with --render: the JSON's folder)")
    p.add_argument("--no-plot", action="store_true", help="skip bench.png")
    p.add_argument("--time-limit", type=positive_float, metavar="S",
                   help="stop starting new measurements after S seconds; the rest are "
                        "marked skipped")
    p.add_argument("--warmup", type=positive_int, metavar="MS", help="do_bench warmup (ms)")
    p.add_argument("--rep", type=positive_int, metavar="MS", help="do_bench rep (ms)")
    p.add_argument("--slow-ms", type=positive_float, default=50.0,
                   help="a call slower than this is timed by wall clock, not do_bench (50)")
    p.add_argument("--slow-budget", type=positive_float, metavar="S",
                   help="seconds of calls per slow measurement (GPU: 5, quick 3; CPU 0.5)")
    p.add_argument("--cpu-table", action="store_true",
                   help="with --device cpu: the CPU table instead (fused_rnn.bench.cpu): torch.nn "
                        "against fused_rnn's layers (auto) at whole-layer shapes, fwd+bwd, one "
                        "thread, median of 5; prints markdown, writes nothing")
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
        parser.error(f"--render {path}: not a readable bench.json ({short_error(e)})")
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


def _selection(args, cuda: bool):
    """(mode, shapes, dtypes, baselines, base_dtype): the arguments, or the device's defaults."""
    shapes = [(n, SHAPES[n]) for n in (args.shapes or [])] + list(args.shape)
    if not cuda:
        print("no CUDA GPU" + (" used (--device cpu)" if torch.cuda.is_available() else
                               " (torch.cuda.is_available() is False)") +
              ": CPU mode — wall-clock medians (time.perf_counter), the reference loop and "
              "torch.nn on the CPU, Triton paths only under TRITON_INTERPRET=1. These numbers "
              "say nothing about GPU speed.", file=sys.stderr)
        baselines = args.baselines if args.baselines is not None else ["cudnn", "reference"]
        return "CPU mode", shapes or [CPU_SHAPE], args.dtypes or ["fp32"], baselines, "fp32"
    mode = "GPU quick" if args.quick else "GPU full"
    shapes = shapes or [(n, SHAPES[n]) for n in (("S1", "S2") if args.quick else SHAPES)]
    dtypes = args.dtypes or (["fp16", "bf16"] if args.quick else list(DTYPES))
    # --quick leaves torch.compile out (its compile alone outlasts a quick run's budget)
    baselines = args.baselines if args.baselines is not None else (
        ["cudnn", "reference"] if args.quick else list(BASELINES))
    return mode, shapes, dtypes, baselines, "fp16"


def _sweep(plan, s: Settings, data: dict, out: str) -> None:
    """Run every case into data["results"], writing the files after each one; a SIGTERM or
    Ctrl-C ends the sweep with what was measured (data["interrupted"] says so)."""
    total = sum(len(c.modes) for c in plan if not c.na)
    print(f"{data['config']['mode']}: {len(plan)} cases, {total} measurements; out: {out}",
          file=sys.stderr)
    progress = _progress_factory(total)

    def on_term(signum, frame):
        raise Interrupted(f"signal {signum}")

    old = None
    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: no handler, a SIGTERM just ends the process
        pass
    s.deadline = None if s.time_limit_s is None else time.perf_counter() + s.time_limit_s
    threads = torch.get_num_threads()
    if s.device.type != "cuda":  # one thread: OpenMP spin-waits make CPU timings erratic
        torch.set_num_threads(1)
    try:
        for i, c in enumerate(plan):
            data["results"].append(run_case(c, s, progress))
            if i + 1 < len(plan):  # a sweep cut short keeps what it measured
                write_outputs(data, out, plot=False)
    except (KeyboardInterrupt, Interrupted) as e:
        if getattr(e, "record", None) is not None:
            data["results"].append(e.record)
        data["interrupted"] = f"interrupted ({e or 'Ctrl-C'}) after {len(data['results'])} cases"
        print(f"\n{data['interrupted']}: writing what was measured", file=sys.stderr)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        torch.set_num_threads(threads)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.render:
        if not os.path.isfile(args.render):
            parser.error(f"--render: no such file {args.render!r}")
        return _render_only(args.render, args, parser)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    if args.cpu_table:
        if args.device != "cpu":
            parser.error("--cpu-table runs on the CPU: give --device cpu")
        from .cpu import run

        run()
        return 0

    args.out = args.out or "bench/out"
    try:  # now, not after the first case: a folder that cannot be made is a usage error
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: {e.strerror or e}")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    mode, shapes, dtypes, baselines, base_dtype = _selection(args, cuda)
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
    t_start = time.perf_counter()
    _sweep(plan, s, data, args.out)
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
