"""How each benchmark row is timed: two first calls (JIT, torch.compile), then
``triton.testing.do_bench``'s median on CUDA, or a synchronised wall-clock median where a call is
slow or there is no GPU; the CUDA peak memory of one fwd+bwd; and ``run_case``, which builds a
row's problem, times each mode and returns the row's record (the JSON fields)."""
from __future__ import annotations

import gc
import time
import statistics
import warnings
from typing import Callable, List, Sequence, Tuple

import torch

from .cases import DTYPES, MODE_KEY, PATHS, Case, Settings, make_problem, short_error
from .paths import BASELINE_BUILDS, kernel_note


class Interrupted(BaseException):
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
        # (rep=100 alone would give a median of 2 for a call of ~36 ms).
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


def _fallback_warnings(fn: Callable[[], None]) -> List[str]:
    """Run ``fn`` once and return the entry points' "using the reference path" warnings.
    fused_rnn warns once per process and reason, so the record of reasons already warned is set
    aside for the call and put back after."""
    from .. import _backend

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


def _skip(rec: dict, labels, progress, status: str, shown: str, note: str) -> dict:
    """Mark every mode of a case that will not run: one progress line each, one note."""
    for lab in labels:
        progress(lab)(shown)
    rec["status"] = status
    rec["notes"].append(note)
    return rec


def _note_kernels(rec: dict, c: Case, p, fwd_only) -> None:
    """A fused row's notes: that it fell back to the reference path, or what its kernels took."""
    try:
        fell = _fallback_warnings(fwd_only)
    except Exception:
        fell = []  # the measurement below meets the same error and records it
    if fell:  # the entry point ran the reference path: this row times no kernel of ours
        rec["fallback"] = True
        rec["notes"].append("FELL BACK to the reference path: " + fell[0])
        return
    try:
        note = kernel_note(c, p)
    except Exception as e:  # recorded in the row; the measurement goes on
        note = f"kernel configuration: {short_error(e)}"
    if note:
        rec["notes"].append(note)


def run_case(c: Case, s: Settings, progress: Callable[[str], Callable[[str], None]]) -> dict:
    rec = _new_record(c, s.device)
    if c.na:
        return rec
    labels = [f"{c.cell} {c.shape} {c.dtype} {c.method} {m}" for m in c.modes]
    if c.kind == "fused":
        why = PATHS[c.method].available(s.device)
        if why:
            return _skip(rec, labels, progress, "skipped", f"skipped: {why}", why)
    fwd = grads = p = None
    try:
        if s.deadline is not None and time.perf_counter() > s.deadline:
            raise TimeoutError("time limit reached")
        p = make_problem(c.cell, c.B, c.T, c.H, DTYPES[c.dtype], s.device)
        if c.kind == "fused":
            fwd, grads = PATHS[c.method].build(p), p.leaves()
        else:
            fwd, grads = BASELINE_BUILDS[c.kind](p)
    except TimeoutError as e:
        return _skip(rec, labels, progress, "skipped", "skipped: time limit", f"not run: {e}")
    except Exception as e:  # a broken baseline must not stop the sweep: record and go on
        return _skip(rec, labels, progress, "error", f"error: {short_error(e)}",
                     f"setup: {short_error(e)}")

    def fwd_only():
        with torch.no_grad():
            fwd()

    def fwd_bwd():
        fwd().sum().backward()

    if c.kind == "fused":
        _note_kernels(rec, c, p, fwd_only)
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
                done(f"error: {short_error(e)}")
                rec["notes"].append(f"{mode}: {short_error(e)}")
                if s.device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                _clear(grads)
    except Interrupted as e:  # keep what this case measured before the signal
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
