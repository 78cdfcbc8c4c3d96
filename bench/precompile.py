#!/usr/bin/env python3
"""Compile every Triton kernel specialisation that bench/gpu_check.sh's later stages launch,
before any of them is timed, in parallel worker processes that share Triton's on-disk cache.

    python bench/precompile.py [--bench "ARGS"] [--workers N] [--budget-s S] [--list]

The jobs come from the stages' own tables, not from a list kept here: bench/persistent_smoke.py's
cases() (barrier, then --ll), the bench stage's plan (fused_rnn.bench's make_plan for the same
arguments, --bench: gpu_check.sh passes the bench stage's), and bench/memcheck_cases.py's
cases() (persistent first). A job runs its launchers once, compile-only: every Triton launch goes
through JITFunction.run with warmup=True, which specialises and compiles exactly as the launch
would and launches nothing. So a grid barrier that would hang cannot hang here (the smoke stage
finds that out), and the outputs are unset memory: nothing after a launch is checked (memcheck's
own value check fails on them; that is expected and reported as "values unchecked").
T is cut to T when T <= 32, else 16 + T % 16: T is not a constexpr (do_not_specialize) and an int
derived from it keeps Triton's specialisation (== 1, divisible by 16). The graph path's rows
compile as the triton path's (it replays the same step launches; a compile-only launch inside a
capture could not load a module).
It prints the new entries of Triton's cache (kernels compiled), the distinct specialisations
launched, per-source counts, any job that raised, and its wall time.
On the CPU under TRITON_INTERPRET=1 nothing compiles: the jobs run at the stages' CPU sizes
(interpreter dtypes for memcheck), which checks the lists and the launchers (tests/test_gpu_check.py).
Exit status: 0 (a warm-up: jobs that raised are listed, the stages judge), 2 usage, 3 no device.
"""
import argparse
import contextlib
import inspect
import io
import multiprocessing as mp
import os
import shlex
import sys
import time

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
try:
    import fused_rnn  # noqa: F401
except ImportError:  # a source tree that was not installed
    sys.path.insert(0, os.path.dirname(BENCH_DIR))
import memcheck_cases  # noqa: E402
import persistent_smoke  # noqa: E402

DEFAULT_BENCH = "--quick --dtypes bf16 --paths persistent,graph,triton"
LAUNCHES = set()  # the launch keys this process saw (install_hook)
RUN_FOR_REAL = {"interpreter_probe_kernel"}  # its result is read (the interpreter's self-check)


def small_T(T: int) -> int:
    """A short T that Triton specialises like T (== 1, divisible by 16)."""
    return T if T <= 32 else 16 + T % 16


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------------------------------ the jobs
def bench_jobs(bench_args: str, device: torch.device):
    """("bench", cell, shape, B, T, H, dtype, path) of every fused row the bench stage would run."""
    from fused_rnn.bench.cases import DEFAULT_CELLS, PATHS, Settings, make_plan
    from fused_rnn.bench.command import _selection, build_parser

    args = build_parser().parse_args(shlex.split(bench_args))
    _, shapes, dtypes, baselines, base = _selection(args, device.type == "cuda")
    paths = args.paths if args.paths is not None else [n for n, p in PATHS.items() if p.default]
    s = Settings(device, args.quick, 0, 0, 0.0, 0.0, None, base)
    out = []
    for c in make_plan(args.cells or list(DEFAULT_CELLS), shapes, dtypes, paths, [], args.modes or ["fwd"], s):
        path = "triton" if c.method == "graph" else c.method  # the same step launches
        if c.kind == "fused" and PATHS[path].available(device) is None:
            job = ("bench", c.cell, c.shape, c.B, c.T, c.H, c.dtype, path)
            if job not in out:
                out.append(job)
    return out


def smoke_jobs(device: torch.device):
    """("smoke", cell, dtype, ll) of persistent_smoke.py and persistent_smoke.py --ll."""
    return [("smoke", cell, str(dt).replace("torch.", ""), ll) for ll in (False, True)
            for cell, dt, skip in persistent_smoke.cases(ll, device) if not skip]


def memcheck_jobs(device: torch.device):
    """("memcheck", name) of memcheck_cases.py (on the CPU: the interpreter's dtypes, as it runs)."""
    cpu = device.type != "cuda"
    return [("memcheck", c["name"]) for c in memcheck_cases.cases()
            if not cpu or c["dtype"] in ("fp32", "fp64")]


def jobs(bench_args: str, device: torch.device, sources=("smoke", "bench", "memcheck")):
    """Every job, in the order the stages need them."""
    make = {"smoke": lambda: smoke_jobs(device), "bench": lambda: bench_jobs(bench_args, device),
            "memcheck": lambda: memcheck_jobs(device)}
    return [j for s in sources for j in make[s]()]


# ------------------------------------------------------------------ the launch hook and a job
def _spec(v, fixed):
    """What Triton specialises an argument on (a constexpr: its value)."""
    if isinstance(v, torch.Tensor):
        return (str(v.dtype), v.data_ptr() % 16 == 0)
    if fixed or v is None or isinstance(v, (bool, str)):
        return repr(v)
    if isinstance(v, int):
        return "1" if v == 1 else ("D16" if v % 16 == 0 else "i")
    return type(v).__name__


def launch_key(fn, args, kwargs):
    """(kernel name, ((argument, specialisation), ...)) of one launch."""
    params = list(inspect.signature(fn.fn).parameters.values())
    names = [p.name for p in params]
    const = {p.name for p in params if "constexpr" in str(p.annotation)}
    dns = getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize") or ()
    dns = {names[d] if isinstance(d, int) else d for d in dns}
    bound = dict(zip(names, args), **kwargs)
    return fn.fn.__name__, tuple(sorted(
        (k, "i" if k in dns else _spec(v, k in const or k not in names))
        for k, v in bound.items() if k not in ("grid", "warmup")))


def install_hook(compile_only=True):
    """Record every launch in LAUNCHES; compile_only: warmup=True (compile, launch nothing)."""
    from triton.runtime import interpreter, jit

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        if getattr(cls.run, "_precompile", None) is not None:
            cls.run = cls.run._precompile  # reinstall over an earlier hook

        def run(self, *args, _orig=cls.run, **kwargs):
            try:
                LAUNCHES.add(launch_key(self, args, kwargs))
            except Exception as e:  # a record, never a reason to skip the compile
                LAUNCHES.add((getattr(self.fn, "__name__", "?"), (("unkeyed", type(e).__name__),)))
            if compile_only and self.fn.__name__ not in RUN_FOR_REAL:
                kwargs["warmup"] = True
            return _orig(self, *args, **kwargs)

        run._precompile = cls.run
        cls.run = run


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_job(job):
    """Run one job's launchers (the hook decides whether they launch). Returns (job, seconds,
    error or None, launch keys)."""
    LAUNCHES.clear()
    dev, t0, err = _device(), time.perf_counter(), None
    try:
        if job[0] == "smoke":
            _smoke(job, dev)
        elif job[0] == "bench":
            _bench(job, dev)
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # its per-case plan lines
                _memcheck(job, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # reported by the parent, which goes on
        err = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    return job, time.perf_counter() - t0, err, sorted(LAUNCHES)


def _smoke(job, dev):
    from fused_rnn.kernels import config

    _, cell, dt, ll = job
    sm = persistent_smoke
    if dev.type != "cuda":
        sm.B, sm.T, sm.H = sm.CPU_BTH
    sm.T = small_T(sm.T)
    d, ln = sm.inputs(cell, getattr(torch, {"bf16": "bfloat16"}.get(dt, dt)), dev)
    with config.using(ll_sync=ll):
        for path in ("persistent", "step"):
            sm.run(cell, d, ln, path)


def _bench(job, dev, T=None):
    from fused_rnn.bench.cases import DTYPES, PATHS, make_problem

    _, cell, _, B, T0, H, dt, path = job
    p = make_problem(cell, B, T or small_T(T0), H, DTYPES[dt], dev)
    fwd = PATHS[path].build(p)
    with torch.no_grad():  # the bench's fwd mode
        fwd()
    fwd().sum().backward()  # its fwd+bwd mode


def _memcheck(job, dev):
    case = next(c for c in memcheck_cases.cases() if c["name"] == job[1])
    try:
        memcheck_cases.run_case(case, dev)
    except RuntimeError as e:
        if "non-finite" not in str(e):  # unset memory after compile-only launches: expected
            raise


# ---------------------------------------------------------------------------------------- main
def _cache_entries():
    """Kernels in Triton's on-disk cache (one .cubin each); 0 under the interpreter."""
    d = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        return sum(any(f.endswith(".cubin") for f in os.listdir(os.path.join(d, e))) for e in os.listdir(d))
    except OSError:
        return 0


def _worker_init():
    install_hook(compile_only=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", default=DEFAULT_BENCH, metavar="ARGS",
                   help=f"the bench stage's arguments (default: {DEFAULT_BENCH!r})")
    p.add_argument("--only", default="smoke,bench,memcheck", help="job sources, in order")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: cores less 2)")
    p.add_argument("--budget-s", type=float, default=0, help="stop after S seconds (0: none)")
    p.add_argument("--list", action="store_true", help="list the jobs and exit")
    args = p.parse_args(argv)
    sources = [s for s in args.only.split(",") if s]
    if any(s not in ("smoke", "bench", "memcheck") for s in sources):
        p.error(f"--only: smoke, bench, memcheck; got {args.only!r}")
    dev = _device()
    if dev.type != "cuda" and not interpreter_on():
        print("precompile: no CUDA GPU and TRITON_INTERPRET is not set: nothing to compile")
        return 3
    todo = jobs(args.bench, dev, sources)
    if args.list:
        for j in todo:
            print(*j)
        return 0
    workers = max(1, min(len(todo), args.workers or (os.cpu_count() or 4) - 2))
    t0, before = time.perf_counter(), _cache_entries()
    print(f"precompile: {len(todo)} jobs ({', '.join(f'{s} {sum(j[0] == s for j in todo)}' for s in sources)}) "
          f"on {dev}, {workers} workers, compile-only launches", flush=True)
    keys, errors, done = set(), [], 0
    pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init)
    try:
        it = pool.imap_unordered(run_job, todo, chunksize=1)
        for _ in todo:
            left = None if not args.budget_s else args.budget_s - (time.perf_counter() - t0)
            if left is not None and left <= 0:
                raise mp.TimeoutError
            job, sec, err, ks = it.next(timeout=left)
            done += 1
            keys.update(ks)
            if err:
                errors.append(f"{' '.join(map(str, job))}: {err}")
            print(f"  [{done}/{len(todo)}] {sec:5.1f} s {len(ks):3d} launch keys  {' '.join(map(str, job))}"
                  + (f"  RAISED {err}" if err else ""), flush=True)
        pool.close()
    except mp.TimeoutError:
        print(f"precompile: budget of {args.budget_s:.0f} s spent; {len(todo) - done} jobs left to the stages")
    finally:
        pool.terminate()
        pool.join()
    compiled = f"{_cache_entries() - before} kernels" if dev.type == "cuda" else "no kernels (interpreter)"
    print(f"precompile: {done}/{len(todo)} jobs, {len(keys)} distinct specialisations launched, "
          f"{compiled} compiled into Triton's cache, {len(errors)} raised, "
          f"{time.perf_counter() - t0:.1f} s wall", flush=True)
    for e in errors:
        print(f"  raised: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
