#!/usr/bin/env python3
"""Small cases of every Triton kernel, forward and backward, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/memcheck_cases.py

(bench/gpu_check.sh runs exactly that.) The caching allocator is turned off so that every tensor
is its own cudaMalloc: an access past a tensor's end then lands outside any allocation, where
memcheck sees it, instead of inside a neighbour in the same cached block.

Shapes are small and odd (H not a power of two, I ≠ H, B not a multiple of 16, T = 1), with
unsorted variable lengths, missing biases, and every dtype the kernels take; the persistent
kernels' cases run first (gpu_check.sh's memcheck stage may be cut at its limit). The public entry
points (backend="triton") pick the kernels they would pick for a user; the "variant" cases call
the autograd Functions directly to reach the kernels the entry points do not choose at these
sizes (the unfused step kernels, the recompute-gates backward, the persistent kernels with
path="persistent": several programs and a grid barrier per step on a GPU, W_hh resident or
streamed). A variant whose internal signature no longer matches is reported as SKIP (API), not
run; a persistent case whose problem kernels.tiles.plan refuses is a failure.

Each case runs the forward, then backward of (out·dout).sum() + (h_n·dh_n).sum() [+ (c_n·dc_n)]
with h0 / c0 requiring grad, so every gradient output is written ("nan-pad" cases: NaN in x and
in dout past each sequence's end, which must reach nothing). It fails on an exception or a
non-finite value; the error against an fp64 reference is printed for information (tests/ judge
accuracy). Exit status: 0 every case ran clean, 1 a case failed, 3 no device to run on.

Without a GPU it runs on the CPU only under TRITON_INTERPRET=1 (the Triton interpreter), which
checks that the script itself works; memcheck needs the GPU.
"""
import argparse
import inspect
import os
import sys
import time
import traceback

import torch

try:
    import fused_rnn
except ImportError:  # run from a source tree that was not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_rnn
from fused_rnn.reference import lstm_sequence_ref, rnn_sequence_ref

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


class ApiChanged(Exception):
    pass


def _inputs(cell, B, T, I, H, dtype, device, lengths, bias, seed):
    """cell: lstm, lnlstm, rnn, or lstm_proj / lnlstm_proj (nn.LSTM's proj_size, P = H // 2)."""
    g = torch.Generator().manual_seed(seed)
    G = 4 * H if cell.startswith(("lstm", "lnlstm")) else H
    P = max(1, H // 2) if cell.endswith("_proj") else H  # the width of h
    k = H ** -0.5

    def r(*shape, scale=1.0, grad=True):
        t = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    d = {
        "x": r(T, B, I), "h0": r(B, P, scale=0.5), "w_ih": r(G, I, scale=k), "w_hh": r(G, P, scale=k),
        "b_ih": r(G, scale=k) if bias else None, "b_hh": r(G, scale=k) if bias else None,
        "c0": r(B, H, scale=0.5) if G == 4 * H else None, "ln": None, "lengths": None,
        "w_hr": r(P, H, scale=k) if P != H else None,
    }
    if cell.startswith("lnlstm"):
        d["ln"] = (r(4 * H, scale=0.2), r(4 * H, scale=0.2), r(H, scale=0.2), r(H, scale=0.2))
        with torch.no_grad():
            d["ln"][0].add_(1)
            d["ln"][2].add_(1)
    if lengths:
        n = torch.randint(1, T + 1, (B,), generator=g)
        n[B // 2] = T  # at least one full-length row, not the first: unsorted
        d["lengths"] = n.to(device)
    return d


def _leaves(d):
    ts = [d["x"], d["h0"], d["c0"], d["w_ih"], d["w_hh"], d["w_hr"], d["b_ih"], d["b_hh"]] + list(d["ln"] or ())
    return [t for t in ts if t is not None]


def _run_public(cell, d, nonlinearity):
    if cell.startswith(("lstm", "lnlstm")):
        return fused_rnn.lstm_sequence(d["x"], d["h0"], d["c0"], d["w_ih"], d["w_hh"], d["b_ih"],
                                       d["b_hh"], ln=d["ln"], lengths=d["lengths"], backend="triton",
                                       w_hr=d["w_hr"])
    return fused_rnn.rnn_sequence(d["x"], d["h0"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                                  lengths=d["lengths"], nonlinearity=nonlinearity, backend="triton")


_LSTM_FN_ARGS = ["ctx", "x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "gw", "gb", "cw", "cb",
                 "lengths", "eps", "allow_tf32", "fused", "save_gates", "path"]
_RNN_FN_ARGS = ["ctx", "x", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "lengths", "nonlinearity",
                "allow_tf32", "fused", "path"]


def _check_persistent(cell, d, path):
    """A persistent case must really run the persistent kernels (fwd and bwd plans exist)."""
    if path != "persistent":
        return
    B, H, dt, dev = d["x"].shape[1], d["w_hh"].shape[1], d["x"].dtype, d["x"].device
    if cell in ("lstm", "lnlstm"):
        from fused_rnn.kernels import lstm as k

        plans = [k.persistent_plan(x, B, H, d["ln"], True, dt, dev) for x in ("fwd", "bwd")]
    else:
        from fused_rnn.kernels import rnn as k

        plans = [k.persistent_plan(x, B, H, True, dt, dev) for x in ("fwd", "bwd")]
    for plan, why in plans:
        if plan is None:
            raise RuntimeError(f"the persistent kernels would not run: {why}")
    from fused_rnn.kernels import config

    ll = config.options().ll_sync
    if any(p.ll != ll for p, _ in plans):  # a "persistent-ll" case must really take the LL exchange
        raise RuntimeError(f"the plans' LL exchange is not ll_sync={ll}: {plans}")
    print(f"    persistent plan: {plans[0][0]}", flush=True)


def _run_variant(cell, d, nonlinearity, fused, save_gates, path="auto"):
    """The autograd Functions with a kernel choice the entry points do not make here."""
    if cell in ("lstm", "lnlstm"):
        from fused_rnn import lstm as mod

        fn = getattr(mod, "LSTMFunction", None)
        if fn is None or list(inspect.signature(fn.forward).parameters) != _LSTM_FN_ARGS:
            raise ApiChanged("fused_rnn.lstm.LSTMFunction.forward's arguments changed")
        _check_persistent(cell, d, path)
        gw, gb, cw, cb = d["ln"] if d["ln"] is not None else (None,) * 4
        return fn.apply(d["x"], d["h0"], d["c0"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                        gw, gb, cw, cb, d["lengths"], 1e-5, False, fused, save_gates, path)
    from fused_rnn import rnn as mod

    fn = getattr(mod, "RNNFunction", None)
    if fn is None or list(inspect.signature(fn.forward).parameters) != _RNN_FN_ARGS:
        raise ApiChanged("fused_rnn.rnn.RNNFunction.forward's arguments changed")
    _check_persistent(cell, d, path)
    return fn.apply(d["x"], d["h0"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"], d["lengths"],
                    nonlinearity, False, fused, path)


def _reference(cell, d, nonlinearity):
    def up(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    e = {k: (up(v) if isinstance(v, torch.Tensor) and k != "lengths" else v) for k, v in d.items()}
    if d["ln"] is not None:
        e["ln"] = tuple(up(t) for t in d["ln"])
    if cell.startswith(("lstm", "lnlstm")):
        res = lstm_sequence_ref(e["x"], e["h0"], e["c0"], e["w_ih"], e["w_hh"], e["b_ih"], e["b_hh"],
                                e["ln"], e["lengths"], w_hr=e["w_hr"])
    else:
        res = rnn_sequence_ref(e["x"], e["h0"], e["w_ih"], e["w_hh"], e["b_ih"], e["b_hh"],
                               e["lengths"], nonlinearity)
    return e, res


def _rel(a, b):
    b = b.detach().double()
    n = b.norm()
    d = (a.detach().double() - b).norm()
    return float(d / n) if n > 0 else float(d)


def run_case(case, device):
    from fused_rnn.kernels import config

    with config.using(ll_sync=bool(case.get("ll"))):  # the "persistent-ll" cases: tagged words, no barrier
        return _run_case(case, device)


def _run_case(case, device):
    cell, B, T, I, H, dt = case["cell"], case["B"], case["T"], case["I"], case["H"], DT[case["dtype"]]
    nl = case.get("nonlinearity", "tanh")
    d = _inputs(cell, B, T, I, H, dt, device, case.get("lengths", True), case.get("bias", True),
                case["seed"])
    pad = None
    if case.get("nan_pad"):  # [T, B, 1]: the steps past each sequence's end
        pad = (torch.arange(T, device=device).unsqueeze(1) >= d["lengths"].unsqueeze(0)).unsqueeze(-1)
        with torch.no_grad():
            d["x"].masked_fill_(pad, float("nan"))
    if case.get("variant"):
        res = _run_variant(cell, d, nl, case["fused"], case.get("save_gates", True),
                           case.get("path", "auto"))
    else:
        res = _run_public(cell, d, nl)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    cot = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=device, dtype=t.dtype)
           for t in res]
    if pad is not None:
        cot[0] = cot[0].masked_fill(pad, float("nan"))
    loss = sum((t * c).sum() for t, c in zip(res, cot))
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    grads = [t.grad for t in _leaves(d)]
    bad = [i for i, t in enumerate(list(res) + grads) if t is None or not torch.isfinite(t).all()]
    if bad:
        raise RuntimeError(f"non-finite or missing output/grad at positions {bad}")
    e, ref = _reference(cell, d, nl)
    sum((t * c.double()).sum() for t, c in zip(ref, cot)).backward()
    err_out = max(_rel(a, b) for a, b in zip(res, ref))
    err_grad = max(_rel(a.grad, b.grad) for a, b in zip(_leaves(d), _leaves(e)))
    return err_out, err_grad


def cases():
    """Every kernel: LSTM (fused step), LN-LSTM (fused step at small H, unfused above the fused
    limit), RNN tanh/relu (fused step); variants reach the unfused plain LSTM / RNN kernels and
    the LSTM backward that recomputes the gates."""
    try:
        from fused_rnn.kernels import lstm as kl

        ln_fused_max = int(getattr(kl, "LN_FUSED_MAX_H", 256))
    except Exception:
        ln_fused_max = 256
    H_big = ln_fused_max + 3
    c = []

    def add(name, **kw):
        kw.setdefault("seed", len(c))
        c.append(dict(name=name, **kw))

    for dt in ("fp32", "bf16", "fp16", "fp64"):
        add(f"lstm {dt} B3 T5 I19 H37 lengths", cell="lstm", B=3, T=5, I=19, H=37, dtype=dt)
    add("lstm fp16 B5 T1 I8 H24 (T=1, no lengths)", cell="lstm", B=5, T=1, I=8, H=24,
        dtype="fp16", lengths=False)
    add("lstm fp32 B2 T3 I7 H17 no biases", cell="lstm", B=2, T=3, I=7, H=17, dtype="fp32",
        bias=False)
    add("lstm bf16 B17 T4 I40 H70 (B > 16)", cell="lstm", B=17, T=4, I=40, H=70, dtype="bf16")
    for dt in ("fp32", "bf16"):
        add(f"lnlstm {dt} B3 T5 I19 H37 lengths", cell="lnlstm", B=3, T=5, I=19, H=37, dtype=dt)
    add(f"lnlstm fp16 B2 T3 I9 H{H_big} (above the fused LN limit: unfused)", cell="lnlstm",
        B=2, T=3, I=9, H=H_big, dtype="fp16")
    add("lnlstm fp64 B2 T3 I5 H11", cell="lnlstm", B=2, T=3, I=5, H=11, dtype="fp64")
    for nl in ("tanh", "relu"):
        for dt in ("fp32", "bf16"):
            add(f"rnn-{nl} {dt} B3 T5 I19 H37 lengths", cell="rnn", nonlinearity=nl, B=3, T=5,
                I=19, H=37, dtype=dt)
    add("rnn-relu fp16 B4 T1 I8 H33 (T=1, no lengths)", cell="rnn", nonlinearity="relu", B=4,
        T=1, I=8, H=33, dtype="fp16", lengths=False)
    add("rnn-tanh fp64 B2 T3 I6 H13 no biases", cell="rnn", B=2, T=3, I=6, H=13, dtype="fp64",
        bias=False)
    # the LSTM with projections (kernels/lstm_proj.py: cuBLAS products around the unfused kernels,
    # the backward's dout in the state dtype), P = H // 2
    for dt in ("fp32", "bf16"):
        add(f"lstm_proj {dt} B3 T5 I19 H37 P18 lengths", cell="lstm_proj", B=3, T=5, I=19, H=37, dtype=dt)
    add("lnlstm_proj fp16 B17 T4 I8 H70 P35 lengths", cell="lnlstm_proj", B=17, T=4, I=8, H=70, dtype="fp16")
    # variants: the kernels the entry points do not choose at these sizes
    add("variant lstm fp32 unfused step", cell="lstm", B=3, T=5, I=19, H=37, dtype="fp32",
        variant=True, fused=False)
    add("variant lstm bf16 unfused step", cell="lstm", B=3, T=5, I=19, H=37, dtype="bf16",
        variant=True, fused=False)
    add("variant lstm fp32 recompute gates (save_gates=False)", cell="lstm", B=3, T=5, I=19,
        H=37, dtype="fp32", variant=True, fused=True, save_gates=False)
    add("variant lnlstm bf16 unfused LN step", cell="lnlstm", B=3, T=5, I=19, H=37,
        dtype="bf16", variant=True, fused=False)
    add("variant lnlstm fp32 recompute gates", cell="lnlstm", B=3, T=5, I=19, H=37,
        dtype="fp32", variant=True, fused=True, save_gates=False)
    for nl in ("tanh", "relu"):
        add(f"variant rnn-{nl} fp32 unfused step", cell="rnn", nonlinearity=nl, B=3, T=5, I=19,
            H=37, dtype="fp32", variant=True, fused=False)
    # the persistent kernels (kernels/lstm_persistent.py, rnn_persistent.py): on a GPU BLOCK_H = 16,
    # so H=37 is 3 programs
    # meeting at a grid barrier each step; bf16 holds W_hh resident (fp16 takes the same code),
    # fp32 (no TF32) and fp64 stream it; B=17 and B=64 are one row block of 32 and 64
    pers = dict(variant=True, fused=True, path="persistent")
    for dt in ("fp32", "bf16", "fp64"):
        add(f"persistent lstm {dt} B3 T5 I19 H37 lengths", cell="lstm", B=3, T=5, I=19, H=37,
            dtype=dt, **pers)
    add("persistent lstm bf16 B17 T4 I40 H70 (5 programs)", cell="lstm", B=17, T=4, I=40, H=70,
        dtype="bf16", **pers)
    add("persistent lstm bf16 B64 T3 I16 H300 (19 programs, K_pad 512)", cell="lstm", B=64, T=3,
        I=16, H=300, dtype="bf16", **pers)
    add("persistent lstm fp32 B5 T1 I8 H24 (T=1, no lengths, no biases)", cell="lstm", B=5, T=1,
        I=8, H=24, dtype="fp32", lengths=False, bias=False, **pers)
    for nl, dt in (("tanh", "fp32"), ("relu", "bf16")):
        add(f"persistent rnn-{nl} {dt} B3 T5 I19 H37 lengths", cell="rnn", nonlinearity=nl, B=3,
            T=5, I=19, H=37, dtype=dt, **pers)
    add("persistent rnn-tanh fp64 B2 T3 I6 H13 no biases", cell="rnn", B=2, T=3, I=6, H=13,
        dtype="fp64", bias=False, **pers)
    add("persistent rnn-tanh bf16 B64 T3 I8 H200 (13 programs)", cell="rnn", B=64, T=3, I=8,
        H=200, dtype="bf16", **pers)
    # W_hh kept on chip in 12 chunks of 64 rows per gate (kernels.config Options.w_chunked: K_pad
    # 1024 is over the whole tile's limit); the CUDA tests' and the benchmark's S4 plan
    add("persistent lstm bf16 B16 T3 I8 H768 lengths (48 programs, W_hh in 12 chunks)", cell="lstm", B=16,
        T=3, I=8, H=768, dtype="bf16", **pers)
    # several row blocks of 64 rows, each with its own barrier counter (the last one partial)
    add("persistent lstm bf16 B130 T3 I8 H40 (3 row blocks x 3 programs)", cell="lstm", B=130, T=3,
        I=8, H=40, dtype="bf16", **pers)
    # the layer-norm LSTM's persistent kernels (kernels/ln_lstm_persistent.py): partials of the row
    # statistics exchanged through global memory; B3 H37 takes the 2-barrier forward (MERGE_C), B70 H300 the
    # 3-barrier one (kernels.tiles.fwd_merge_c)
    for dt in ("fp32", "bf16"):
        add(f"persistent lnlstm {dt} B3 T5 I19 H37 lengths", cell="lnlstm", B=3, T=5, I=19, H=37,
            dtype=dt, **pers)
    add("persistent lnlstm bf16 B70 T3 I8 H300 (2 row blocks x 19 programs)", cell="lnlstm", B=70,
        T=3, I=8, H=300, dtype="bf16", **pers)
    # the plain kernels with the LL exchange instead of the barrier (Options.ll_sync):
    # 32-bit words (bf16) and 64-bit words (fp32, W_hh streamed), several row blocks
    ll = dict(pers, ll=True)
    add("persistent-ll lstm bf16 B3 T5 I19 H37 lengths", cell="lstm", B=3, T=5, I=19, H=37, dtype="bf16", **ll)
    add("persistent-ll lstm fp32 B17 T4 I40 H70 lengths (streamed)", cell="lstm", B=17, T=4, I=40, H=70,
        dtype="fp32", **ll)
    add("persistent-ll rnn-tanh bf16 B3 T5 I19 H37 lengths", cell="rnn", B=3, T=5, I=19, H=37, dtype="bf16",
        **ll)
    add("persistent-ll rnn-tanh fp32 B5 T1 I8 H24 (T=1)", cell="rnn", B=5, T=1, I=8, H=24, dtype="fp32",
        lengths=False, **ll)
    add("persistent-ll lstm bf16 B130 T3 I8 H40 (3 row blocks x 3 programs)", cell="lstm", B=130, T=3, I=8,
        H=40, dtype="bf16", **ll)
    # the layer-norm LSTM's LL exchange (rows and LayerNorm partials as tagged words; B16, 16-bit:
    # kernels.tiles.ln_ll_fits)
    add("persistent-ll lnlstm bf16 B3 T5 I19 H37 lengths", cell="lnlstm", B=3, T=5, I=19, H=37, dtype="bf16", **ll)
    # NaN in x and dout past the ends (issue 17): every output and gradient must stay finite
    nan = dict(nan_pad=True, B=3, T=5, I=19, H=37)
    for cell, dt in (("lstm", "bf16"), ("lnlstm", "fp32"), ("lstm_proj", "bf16"), ("lnlstm_proj", "fp32")):
        add(f"nan-pad {cell} {dt} B3 T5 I19 H37 lengths", cell=cell, dtype=dt, **nan)
    add("nan-pad rnn-relu bf16 B3 T5 I19 H37 lengths", cell="rnn", nonlinearity="relu", dtype="bf16", **nan)
    for cell, dt in (("lstm", "bf16"), ("lnlstm", "bf16"), ("rnn", "fp32")):
        add(f"nan-pad persistent {cell} {dt} B3 T5 I19 H37 lengths", cell=cell, dtype=dt, **pers, **nan)
    add("nan-pad persistent-ll lstm bf16 B3 T5 I19 H37 lengths", cell="lstm", dtype="bf16", **ll, **nan)
    # the persistent kernels first (barrier, then LL), so a run cut at its time limit loses the
    # others; each case keeps the seed of its place above (stable sort)
    return sorted(c, key=case_rank)


def case_rank(case):
    """0 the persistent kernels with the barrier, 1 with the LL exchange, 2 every other case."""
    if case.get("path") != "persistent":
        return 2
    return 1 if case.get("ll") else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("-k", dest="pattern", help="run only cases whose name contains this")
    p.add_argument("--exclude", metavar="TEXT[,TEXT]", help="leave out cases whose name contains one of "
                   "these (gpu_check.sh: 'persistent' when the persistent smoke test failed, "
                   "'persistent-ll' when the LL one did)")
    args = p.parse_args(argv)
    excl = [e for e in (args.exclude or "").split(",") if e]
    todo = [c for c in cases() if (not args.pattern or args.pattern in c["name"])
            and not any(e in c["name"] for e in excl)]
    if args.list:
        for c in todo:
            print(c["name"])
        return 0
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            print("memcheck_cases: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
            return 3
        device = torch.device("cuda")
    elif interp:
        device = torch.device("cpu")
        todo = [c for c in todo if c["dtype"] in ("fp32", "fp64")]  # the interpreter's dtypes
        print("memcheck_cases: no CUDA GPU; running the cases on the CPU through the Triton "
              "interpreter (fp32/fp64 only). This checks the script, not memory safety.")
    else:
        print("memcheck_cases: no CUDA GPU and TRITON_INTERPRET is not set: nothing to run",
              file=sys.stderr)
        return 3
    print(f"memcheck_cases: {len(todo)} cases on {device} (torch {torch.__version__}, "
          f"fused_rnn {fused_rnn.__version__})", flush=True)
    failed = skipped = 0
    t_all = time.perf_counter()
    for i, c in enumerate(todo, 1):
        t0 = time.perf_counter()
        try:
            eo, eg = run_case(c, device)
            print(f"[{i}/{len(todo)}] ok    {c['name']}: rel err out {eo:.1e}, grads {eg:.1e} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        except ApiChanged as e:
            skipped += 1
            print(f"[{i}/{len(todo)}] SKIP (API) {c['name']}: {e}", flush=True)
        except Exception as e:
            failed += 1
            print(f"[{i}/{len(todo)}] FAIL  {c['name']}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=4)
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception as e2:  # a sticky CUDA error: later cases cannot run
                    print(f"memcheck_cases: CUDA context broken ({e2}); stopping", flush=True)
                    return 1
    print(f"memcheck_cases: {len(todo) - failed - skipped} ok, {failed} failed, {skipped} "
          f"skipped (API) in {time.perf_counter() - t_all:.1f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
