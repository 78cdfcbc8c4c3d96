#!/usr/bin/env python3
"""The step path's host cost per time step, measured without a GPU.

    python bench/host_overhead.py [--steps 1024] [--repeat 9] [--threads 1] [--json PATH]

Runs the step loops of the LSTM, the tanh RNN, the GRU and the layer-norm LSTM (H 64: one kernel a
step; H 256: torch.mm, then the unfused kernel), forward and backward, on meta tensors, with Triton's
driver replaced by a stand-in (current device, stream, target) and each kernel's compile by a fake
CompiledKernel whose launcher is a recorder. Triton's dispatch runs in full up to the launcher
call: argument binding and specialisation, the cache key and lookup, @triton.heuristics, the
launch metadata. Left out, paid alike by both paths: the launcher itself (Triton 3.9's
CudaLauncher.__call__ and its C launch, 3.6's compiled launcher module) and cuLaunchKernel.

Per cell and direction it prints µs a step before (options().direct_launch off: Triton's
kernel[grid](...) every step), after (kernels._common.StepLauncher: the CompiledKernel's launcher
called directly after the first step), and, where a step also runs torch.mm (on meta tensors: its
dispatch and shape function, not its CUDA host cost), launch: after with torch.mm a no-op. A
step's cost is the slope of the loop's thread CPU time (best of --repeat runs) over two sequence
lengths, so the per-call work drops out. tests/test_host_overhead.py checks the
launches the recorder sees; RESULTS.md has the figures.
"""
import argparse
import collections
import contextlib
import gc
import json
import os
import sys
import time

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime.autotuner import Heuristics
from triton.runtime import driver

from fused_rnn.kernels import _common, config, gru, lstm, rnn

STREAM = 0x5EED  # the stand-in driver's current stream
KERNELS = (lstm.lstm_fwd_kernel, lstm.lstm_bwd_kernel, rnn.rnn_fwd_kernel, rnn.rnn_bwd_kernel, gru.gru_fwd_kernel,
           gru.gru_bwd_kernel)
# (cell, H): the layer-norm LSTM at H 64 runs the fused kernel, at 256 torch.mm and the unfused one
CELLS = (("lstm", 64), ("rnn", 64), ("gru", 64), ("lnlstm", 64), ("lnlstm", 256))
B, I = 4, 8
TARGET_US = 3.0  # issue 20: the host cost of a step's launch


class _Driver:
    """Triton's active driver as JITFunction.run and StepLauncher query it, with no GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return STREAM

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class _Compiled:
    """A loaded CompiledKernel as the launch path reads it, with Triton's own ``run`` and
    ``launch_metadata``; the launcher it returns is the recorder."""

    run = CompiledKernel.run
    launch_metadata = CompiledKernel.launch_metadata
    _init_handles = CompiledKernel._init_handles

    def __init__(self, name, log):
        self.name, self.function, self.packed_metadata = name, hash(name), (name, 4, 1)
        self.module, self.src = "loaded", None
        self._run = lambda *a: log.append((name, a))


def _jit(kernel):
    return kernel.fn if isinstance(kernel, Heuristics) else kernel


@contextlib.contextmanager
def recording(kernels=KERNELS):
    """Launch ``kernels`` into a list of (kernel name, launcher arguments) instead of a GPU;
    Triton's driver, caches and compile restored after."""
    log, saved = [], driver._active
    jits = [_jit(k) for k in kernels]
    caches = [j.device_caches for j in jits]
    driver.set_active(_Driver())
    try:
        for j in jits:
            j.device_caches = collections.defaultdict(j.create_binder)

            def compile_(key, signature, device, constexprs, options, attrs, warmup, j=j):
                k = j.device_caches[device][0][key] = _Compiled(j.__name__, log)
                return k

            j._do_compile = compile_
        yield log
    finally:
        driver.set_active(saved)
        for j, c in zip(jits, caches):
            j.device_caches = c
            j.__dict__.pop("_do_compile", None)


def steps_of(log, kernels=KERNELS):
    """[(kernel name, t), ...] of the recorded launches, in order."""
    at = {_jit(k).__name__: 9 + _jit(k).arg_names.index("t") for k in kernels}
    return [(name, a[at[name]]) for name, a in log]


def problem(cell, H, T, dtype=torch.float32, device="meta"):
    """(forward, backward, whether a step runs torch.mm and the unfused kernel): closures of one
    layer's step loops, T steps, B rows, meta tensors."""
    G = {"rnn": H, "gru": 3 * H}.get(cell, 4 * H)
    w = dict(dtype=dtype, device=device)
    x, h0, c0 = torch.empty(T, B, I, **w), torch.empty(B, H, **w), torch.empty(B, H, **w)
    w_ih, w_hh, b = torch.empty(G, I, **w), torch.empty(G, H, **w), torch.empty(G, **w)
    if cell == "rnn":
        out, _, hs = rnn.rnn_fwd(x, h0, w_ih, w_hh, b, b)
        return (lambda: rnn.rnn_fwd(x, h0, w_ih, w_hh, b, b),
                lambda: rnn.rnn_bwd(out, h0, x, w_ih, w_hh, hs, need_dx=False, need_dw=False), False)
    if cell == "gru":
        out, _, hs, gates = gru.gru_fwd(x, h0, w_ih, w_hh, b, b)
        return (lambda: gru.gru_fwd(x, h0, w_ih, w_hh, b, b),
                lambda: gru.gru_bwd(out, h0, x, w_ih, w_hh, hs, gates, need_dx=False, need_dw=False), False)
    ln = (torch.empty(G, **w), torch.empty(G, **w), torch.empty(H, **w), torch.empty(H, **w)) \
        if cell == "lnlstm" else None
    out, _, _, hs, cs, gates = lstm.lstm_fwd(x, h0, c0, w_ih, w_hh, b, b, ln=ln)
    return (lambda: lstm.lstm_fwd(x, h0, c0, w_ih, w_hh, b, b, ln=ln),
            lambda: lstm.lstm_bwd(out, h0, c0, x, w_ih, w_hh, hs, cs, gates, b, b, ln=ln, need_dx=False,
                                  need_dw=False), not config.default_fused(H, ln, dtype))


def _best_us(fn, log, repeat):
    """The least thread CPU time of ``repeat`` runs (other processes' load drops out)."""
    best = float("inf")
    for _ in range(repeat):
        log.clear()
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e6


def _per_step(long_, short_, log, repeat, steps):
    gc.disable()
    try:
        return (_best_us(long_, log, repeat) - _best_us(short_, log, repeat)) / steps
    finally:
        gc.enable()


@contextlib.contextmanager
def _torch_mm(run: bool):
    """torch.mm as it is, or (run False) with its out= calls skipped (they return out): the
    step's cost without the unfused kernels' torch.mm. On meta tensors nothing is computed
    either way; torch's own decompositions call it without out=."""
    if run:
        yield
        return
    mm = torch.mm
    torch.mm = lambda *args, out=None, **kwargs: out if out is not None else mm(*args, **kwargs)
    try:
        yield
    finally:
        torch.mm = mm


def measure(steps=1024, repeat=9, short=64):
    """One row per cell and direction: µs a step before (Triton's dispatch every step), after (the
    direct launch), launch (after without torch.mm: the unfused kernels' rows), the paths taken."""
    rows = []
    with recording() as log:
        for cell, H in CELLS:
            long_, short_ = problem(cell, H, steps), problem(cell, H, short)
            for d, direction in enumerate(("fwd", "bwd")):
                row = dict(cell=cell, H=H, direction=direction, mm=long_[2])
                for mode, direct, mm in (("before", False, True), ("after", True, True), ("launch", True, False)):
                    if mode == "launch" and not long_[2]:
                        row["launch_us"] = row["after_us"]
                        continue
                    with config.using(direct_launch=direct), _torch_mm(mm):
                        _common.LAUNCH_PATHS.clear()
                        long_[d](), short_[d]()  # warm: the (fake) compile, Triton's caches
                        row[mode + "_us"] = round(_per_step(long_[d], short_[d], log, repeat, steps - short), 2)
                        row[mode + "_path"] = ", ".join(sorted(set(_common.LAUNCH_PATHS.values())))
                rows.append(row)
    return rows


def table(rows, threads):
    import platform

    import triton

    out = [f"machine: {platform.machine()}, {os.cpu_count()} cores, {threads} torch thread(s), "
           f"torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}",
           "µs a step, thread CPU time (best of the runs); launch: after with its torch.mm skipped",
           "cell      H  dir  a step       before   after  launch  after: path",
           "------  ---  ---  -----------  ------  ------  ------  -----------"]
    for r in rows:
        what = "mm + kernel" if r["mm"] else "kernel"
        out.append(f"{r['cell']:<6}  {r['H']:>3}  {r['direction']}  {what:<11}  {r['before_us']:>6.2f}  "
                   f"{r['after_us']:>6.2f}  {r['launch_us']:>6.2f}  {r['after_path']}")
    over = [f"{r['cell']} H{r['H']} {r['direction']}" for r in rows if r["launch_us"] > TARGET_US]
    out.append(f"target: launch <= {TARGET_US:g} µs a step: " + ("met in every row" if not over else
                                                                "missed by " + ", ".join(over)))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1024, help="T of the long run (the short one: T / 16)")
    p.add_argument("--repeat", type=int, default=9, help="runs per timing (the least is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", metavar="PATH", help="also write the rows here")
    args = p.parse_args(argv)
    if args.steps < 17 or args.repeat < 1:
        p.error("--steps must be >= 17 and --repeat >= 1")
    torch.set_num_threads(args.threads)
    rows = measure(args.steps, args.repeat, max(1, args.steps // 16))
    print(table(rows, args.threads))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
