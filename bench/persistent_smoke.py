#!/usr/bin/env python3
"""First contact of the persistent kernels with a GPU: one small problem per cell, persistent
path against the step path, forward and backward, with a rough timing of each.

    python bench/persistent_smoke.py            (bench/gpu_check.sh runs it under `timeout`)
    python bench/persistent_smoke.py --ll       (the same with the LL exchange, kernels.config
                                                 Options.ll_sync, instead of the grid barrier)

Why a separate script: the persistent kernels' programs wait for each other at a grid barrier
every step. If that barrier is wrong on real hardware, a launch never returns, and a benchmark or
test that calls it hangs until its stage is killed, losing what it would have measured after.
gpu_check.sh runs this first, under a short timeout, and leaves the persistent path out of the
later stages when it fails.

Problem: B16 T64 H256 in bf16 and fp32 (16 programs of BLOCK_H = 16 on an H100), plain LSTM, tanh
RNN, and the layer-norm LSTM when its persistent kernels exist. For each: the persistent and step
results (out, h_n, [c_n], and the gradients of x, h0, W_ih, W_hh) must agree within 2e-2 (bf16)
or 1e-4 (fp32) relative (and each path's worst error against the reference path is printed
beside, so that a disagreement says which path is off: the step kernels' tiles are new on a GPU
too); it prints the errors, the persistent plans, what the kernels compiled to
(registers, spills, shared memory) and median times of a few fwd+bwd calls on each path.
--ll: the same cells with the LL exchange (programs spin on tagged words instead of meeting at a
barrier: a protocol that has never run on a GPU, so it gets its own stage and timeout in
gpu_check.sh; the layer-norm LSTM in bf16 only on a GPU, where kernels.tiles.ln_ll_fits
keeps fp32 on the barrier); the timing line then compares the LL kernels with the barrier kernels
(the plans' default variants otherwise) instead of with the step path.
Exit status: 0 all agree, 1 a case failed, 3 no CUDA GPU.
Without a GPU, under TRITON_INTERPRET=1, it runs a tiny problem on the CPU (one program) to
check the script itself (tests/test_cli.py does).
"""
import os
import sys
import time

import torch

try:
    import fused_rnn
except ImportError:  # a source tree that was not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_rnn
from fused_rnn.lstm import lstm_sequence
from fused_rnn.rnn import rnn_sequence

B, T, H = 16, 64, 256
CPU_BTH = (3, 4, 16)  # under the interpreter: the script's own check
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def inputs(cell, dtype, dev):
    g = torch.Generator().manual_seed(0)
    G = H if cell == "rnn" else 4 * H

    def r(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=g) * 2 - 1) * scale).to(dev, dtype).requires_grad_()

    k = H ** -0.5
    d = [r(T, B, H), r(B, H, scale=0.5)]
    if cell != "rnn":
        d.append(r(B, H, scale=0.5))
    d += [r(G, H, scale=k), r(G, H, scale=k), r(G, scale=k), r(G, scale=k)]
    ln = None
    if cell == "lnlstm":
        ln = tuple(r(n, scale=0.2) + s for n, s in ((G, 1.0), (G, 0.0), (H, 1.0), (H, 0.0)))
        ln = tuple(t.detach().requires_grad_() for t in ln)
    return d, ln


def run(cell, d, ln, path, backend="triton"):
    with fused_rnn.use_path(path):
        if cell == "rnn":
            outs = rnn_sequence(*d, backend=backend)
        else:
            outs = lstm_sequence(*d, ln=ln, backend=backend)
        loss = sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs))
        w = d[2:4] if cell == "rnn" else d[3:5]  # x, h0, W_ih, W_hh, and the LN parameters
        grads = torch.autograd.grad(loss, [d[0], d[1], *w, *(ln or ())])
    return [o.detach() for o in outs] + list(grads)


def median_ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - s) * 1e3)
    times.sort()
    return times[len(times) // 2]


def cases(ll, dev):
    """(cell, dtype, why skipped or None): what main() runs; bench/precompile.py compiles the same."""
    for cell in ("lstm", "rnn", "lnlstm"):
        for dtype in (torch.bfloat16, torch.float32):
            skip = None
            if ll and cell == "lnlstm" and dtype == torch.float32 and dev.type == "cuda":
                skip = "no LL in fp32 for the LN kernels on a GPU: ln_ll_fits"
            yield cell, dtype, skip


def main(argv=None) -> int:
    global B, T, H
    ll = "--ll" in (sys.argv[1:] if argv is None else argv)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        print(f"persistent_smoke: {torch.cuda.get_device_name()}, SMs "
              f"{torch.cuda.get_device_properties(0).multi_processor_count}, B{B} T{T} H{H}", flush=True)
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        dev = torch.device("cpu")
        B, T, H = CPU_BTH
        print(f"persistent_smoke: no CUDA GPU; the CPU under the Triton interpreter, B{B} T{T} H{H} "
              "(checks this script, not the GPU)", flush=True)
    else:
        print("persistent_smoke: no CUDA GPU")
        return 3
    from fused_rnn.kernels import config, lstm as KL
    from fused_rnn.kernels import persistent as KP
    from fused_rnn.kernels import rnn as KR

    failed = 0
    with config.using(ll_sync=ll):
        for cell, dtype, skip in cases(ll, dev):
            name = f"{cell} {str(dtype).replace('torch.', '')}"
            if skip:
                print(f"  {name}: skipped ({skip})", flush=True)
                continue
            d, ln = inputs(cell, dtype, dev)
            if cell == "rnn":
                plans = [KR.persistent_plan(x, B, H, True, dtype, dev) for x in ("fwd", "bwd")]
            else:
                plans = [KL.persistent_plan(x, B, H, ln, True, dtype, dev) for x in ("fwd", "bwd")]
            if any(p is None for p, _ in plans):
                print(f"  {name}: no persistent plan ({'; '.join(w for p, w in plans if p is None)})", flush=True)
                continue
            if ll and not all(p.ll for p, _ in plans):
                print(f"  {name}: FAIL the plans do not take the LL exchange", flush=True)
                failed += 1
                continue
            print(f"  {name}: plans fwd {plans[0][0]} | bwd {plans[1][0]}", flush=True)
            s = time.perf_counter()
            try:
                got = run(cell, d, ln, "persistent")
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # reported and counted as a failure, never swallowed
                print(f"  {name}: FAIL persistent raised {type(e).__name__}: {e}", flush=True)
                failed += 1
                continue
            first = time.perf_counter() - s
            ref = run(cell, d, ln, "step")
            errs = [rel(a, b) for a, b in zip(got, ref)]
            worst = max(errs)
            ok = worst <= TOL[dtype] and all(torch.isfinite(g).all() for g in got)
            failed += not ok
            # which side is off when they disagree: both against the reference path (the
            # PyTorch loop, computing in fp32), whose own rounding differs from the kernels'
            truth = run(cell, d, ln, "step", backend="reference")
            vs_ref = [max(rel(a, b) for a, b in zip(x, truth)) for x in (got, ref)]
            print(f"  {name}: {'ok' if ok else 'FAIL'} worst rel err {worst:.2e} "
                  f"({', '.join(f'{e:.1e}' for e in errs)}); first call {first:.1f} s incl. compile; "
                  f"worst against the reference path: persistent {vs_ref[0]:.1e}, step {vs_ref[1]:.1e}",
                  flush=True)
            print(f"    compiled: {KP.LAST_LAUNCH}", flush=True)
            if ok and dev.type == "cuda" and ll:
                tp = median_ms(lambda: run(cell, d, ln, "persistent"))
                with config.using(ll_sync=False):
                    tb = median_ms(lambda: run(cell, d, ln, "persistent"))
                print(f"    fwd+bwd median of 5: persistent LL {tp:.2f} ms, persistent barrier {tb:.2f} ms",
                      flush=True)
            elif ok and dev.type == "cuda":
                tp = median_ms(lambda: run(cell, d, ln, "persistent"))
                ts = median_ms(lambda: run(cell, d, ln, "step"))
                print(f"    fwd+bwd median of 5: persistent {tp:.2f} ms, step {ts:.2f} ms (eager)", flush=True)
    print(f"persistent_smoke{' --ll' if ll else ''}: {'FAILED ' + str(failed) if failed else 'all ok'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
