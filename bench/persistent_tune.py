#!/usr/bin/env python3
"""Time the persistent kernels' plan variants (or, with --step, the step kernels' tiles) at the
benchmark shapes, so that a GPU session chooses block sizes with the numbers beside the choice.

    python bench/persistent_tune.py [--out DIR] [--budget-s 200] [--shapes S1,S2,S4,S3]
                                    [--cells lstm,rnn,lnlstm] [--dtype bf16] [--no-ll] [--step]

Each cell, shape and direction runs the whole-layer launcher on the persistent path under each
kernels.config.using(...) variant:
    lstm, rnn   ll_sync=True (not where plan() keeps the barrier; --no-ll leaves it out), solo=True
                (where it fits), w_chunked=False (S4), early_arrive=False, then BLOCK_H 16 / 32 /
                64 x num_warps 4 / 8 (plan_block_h, plan_num_warps); plan()'s own is "default"
    lnlstm      ll_sync=True (where kernels.tiles.ln_ll_fits), merge_c True / False (forward),
                merge_bwd flipped (backward)
Each variant is checked against the default (relative error of out and dx; beyond 2e-2 in bf16:
WRONG) and timed with triton.testing.do_bench (median); one that cannot run is listed with the
reason, one that raises with its error. Two passes in the order of need (PRIORITY): the default
and the structural variants first, then the BLOCK_H x warps grid; no variant starts past
--budget-s.
--step: the fused LSTM and RNN step launchers captured in a CUDA graph per variant of
config.using(step_tiles=...) (the four 16 / 64-row x 16 / 32-unit tiles, BLOCK_K 64, BLOCK_H 64,
and the unfused kernels after cuBLAS), S3 and S2 first. gpu_check.sh: TUNE_ARGS=--step.
Output: a markdown table on stdout and in DIR/tune.md, every row in DIR/tune.json, and one "best"
line per cell, shape and direction with its ratio to the default. Without a GPU
(TRITON_INTERPRET=1) it runs one tiny shape, to check the script itself (tests/test_cli.py).
"""
import argparse
import json
import os
import sys
import time

import torch

try:
    import fused_rnn  # noqa: F401
except ImportError:  # a source tree that was not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_rnn  # noqa: F401

SHAPES = {"S1": (16, 1024, 256), "S2": (64, 512, 512), "S3": (256, 256, 1024), "S4": (16, 1024, 768)}
CPU_SHAPE = {"tiny": (3, 4, 16)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def make_inputs(cell, B, T, H, dtype, dev):
    g = torch.Generator().manual_seed(0)
    G = H if cell == "rnn" else 4 * H

    def r(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=g) * 2 - 1) * scale).to(dev, dtype)

    k = H ** -0.5
    d = {"x": r(T, B, H), "h0": r(B, H, scale=0.5), "c0": r(B, H, scale=0.5),
         "w_ih": r(G, H, scale=k), "w_hh": r(G, H, scale=k), "b_ih": r(G, scale=k), "b_hh": r(G, scale=k),
         "dout": r(T, B, H), "dh": r(B, H), "dc": r(B, H)}
    d["ln"] = None
    if cell == "lnlstm":
        d["ln"] = tuple(r(n, scale=0.2) + s for n, s in ((G, 1.0), (G, 0.0), (H, 1.0), (H, 0.0)))
    return d


def runners(cell, d, path="persistent", fused=None):
    """(fwd(), bwd()) closures on ``path`` (the persistent one unless given; ``fused``: the
    launchers' argument, None for their default); bwd reuses one forward's saved tensors
    (consume_gates off: every call reads the same gates)."""
    from fused_rnn.kernels import lstm as KL, rnn as KR

    B, H, dtype, dev = d["x"].shape[1], d["w_hh"].shape[1], d["x"].dtype, d["x"].device
    f = True if fused is None else fused

    def plan(direction):  # the launchers take the persistent plan (None: the step loop)
        if path == "step":
            return None
        if cell == "rnn":
            return KR.persistent_plan(direction, B, H, f, dtype, dev)[0]
        return KL.persistent_plan(direction, B, H, d["ln"], f, dtype, dev)[0]

    if cell == "rnn":
        def fwd():
            return KR.rnn_fwd(d["x"], d["h0"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"], None, fused=f,
                              plan=plan("fwd"))
        saved = fwd()

        def bwd():
            return KR.rnn_bwd(d["dout"], d["dh"], d["x"], d["w_ih"], d["w_hh"], saved[2], None, fused=f,
                              plan=plan("bwd"))
        return fwd, bwd, saved

    def fwd():
        return KL.lstm_fwd(d["x"], d["h0"], d["c0"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"], d["ln"], None,
                           fused=fused, plan=plan("fwd"))
    saved = fwd()

    def bwd():
        return KL.lstm_bwd(d["dout"], d["dh"], d["dc"], d["x"], d["w_ih"], d["w_hh"], saved[3], saved[4], saved[5],
                           d["b_ih"], d["b_hh"], d["ln"], None, fused=fused, plan=plan("bwd"))
    return fwd, bwd, saved


# the step variant that runs the unfused kernels: torch's matmul (cuBLAS) for the recurrent
# product, then the pointwise kernel (two launches a step)
STEP_OPTS = {"fused": None}
UNFUSED_VARIANT = "unfused: torch.mm + pointwise kernel"


def step_runners(cell, d, cuda):
    """(fwd(), bwd(), saved) on the step path; on CUDA each captured in a CUDA graph at its first
    call (_graphed) and replayed: fwd() / bwd() replay and return the graph's outputs."""
    fwd, bwd, saved = runners(cell, d, "step", STEP_OPTS["fused"])
    if not cuda:
        return fwd, bwd, saved
    return _graphed(fwd), _graphed(bwd), saved


def _graphed(fn):
    """A function that captures fn in a CUDA graph at its first call (after one eager call on a
    side stream: JIT and cuBLAS set-up stay out of the capture), then replays it, returning the
    graph's outputs."""
    held = []

    def replay():
        if not held:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            held.extend((graph, out))
        held[0].replay()
        return held[1]
    return replay


def step_variants(cell, direction, cuda):
    """[(name, apply(), undo())] of step tiles (config.using(step_tiles=...)): the default first."""
    out = [("default", lambda: None, lambda: None)]
    if not cuda:
        return out

    def tile(**kw):
        return _using(step_tiles=kw)
    for bb, bh in ((16, 32), (16, 16), (64, 32), (64, 16)):  # kernels.tiles.step_tile's choices
        nw = 4 if bb == 16 else 8
        out.append((f"tile {bb}x{bh} warps={nw}", *tile(BLOCK_B=bb, BLOCK_H=bh, num_warps=nw)))
    if direction == "fwd":
        out.append(("BLOCK_K=64 warps=8", *tile(BLOCK_K=64, num_warps=8)))
    else:
        out.append(("BLOCK_K=32", *tile(BLOCK_K=32)))
    out.append(("BLOCK_H=64 warps=8", *tile(BLOCK_H=64, num_warps=8)))

    def unfused():
        STEP_OPTS["fused"] = False

    def fused_again():
        STEP_OPTS["fused"] = None
    out.append((UNFUSED_VARIANT, unfused, fused_again))
    return out


def tile_of(cell, direction, B, H, dtype, dev):
    """The step kernels' tile (BLOCK_B, BLOCK_H, BLOCK_K, warps) as text, options().step_tiles applied."""
    from fused_rnn.kernels import tiles

    n_sm = tiles.sm_count(dev)
    fused = STEP_OPTS["fused"] is not False
    if cell == "rnn":
        t = tiles.rnn_blocks(B, H, direction, fused, dtype, n_sm)
    else:
        t = tiles.lstm_blocks(B, H, direction, fused, False, dtype, n_sm)
    return ("" if fused else "unfused, pointwise ") + "tile %dx%dx%d w%d" % t, ""


LL_VARIANT = "LL exchange (no barrier)"
SOLO_VARIANT = "solo (1 program per row block, all of W_hh)"
STREAMED_VARIANT = "W_hh streamed (not chunk-resident)"
LATE_VARIANT = "barrier: arrive after the whole step (former order)"


def _using(**changes):
    """(apply(), undo()): enter kernels.config.using(**changes), and leave it."""
    from fused_rnn.kernels import config

    held = []

    def apply():
        cm = config.using(**changes)
        cm.__enter__()
        held.append(cm)

    def undo():
        held.pop().__exit__(None, None, None)
    return apply, undo


def variants(cell, direction, cuda, ll=True):
    """[(name, apply(), undo())]: the default first."""
    from fused_rnn.kernels import config

    out = [("default", lambda: None, lambda: None)]
    if not cuda:
        return out
    if cell in ("lstm", "rnn"):
        if ll:
            out.append((LL_VARIANT, *_using(ll_sync=True)))
        out.append((SOLO_VARIANT, *_using(solo=True)))
        out.append((STREAMED_VARIANT, *_using(w_chunked=False)))
        out.append((LATE_VARIANT, *_using(early_arrive=False)))
        for bh in (16, 32, 64):
            for nw in (4, 8):
                out.append((f"BLOCK_H={bh} warps={nw}", *_using(plan_block_h=bh, plan_num_warps=nw)))
        return out
    if ll:  # the layer-norm LSTM: plan_ln takes LL where ln_ll_fits (else its plan is the default's)
        out.append((LL_VARIANT, *_using(ll_sync=True)))
    if direction == "fwd":
        for m in (True, False):
            out.append((f"MERGE_C={m} ({2 if m else 3} barriers)", *_using(merge_c=m)))
    else:
        default = config.options().merge_bwd
        out.append((f"MERGE_BWD={not default} ({2 if not default else 3} barriers)", *_using(merge_bwd=not default)))
    return out


def plan_of(cell, direction, B, H, dtype, dev):
    from fused_rnn.kernels import lstm as KL, rnn as KR

    if cell == "rnn":
        return KR.persistent_plan(direction, B, H, True, dtype, dev)
    ln = () if cell == "lnlstm" else None  # persistent_plan only tests ln for None
    return KL.persistent_plan(direction, B, H, ln, True, dtype, dev)


def time_ms(fn, cuda):
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "tune_out"))
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--shapes", default=None, help="default S1,S2,S4,S3; with --step S3,S2,S1,S4")
    ap.add_argument("--cells", default="lstm,rnn,lnlstm")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--no-ll", action="store_true", help="leave out the LL exchange variant")
    ap.add_argument("--step", action="store_true",
                    help="time the step path's tiles (graph-replayed) instead of the persistent plans")
    a = ap.parse_args(argv)
    from fused_rnn import _backend

    cuda = torch.cuda.is_available() and not _backend.interpreter_on()
    if not cuda and not _backend.interpreter_on():
        print("persistent_tune: no CUDA GPU and TRITON_INTERPRET is not set: nothing to run", file=sys.stderr)
        return 3
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[a.dtype] if cuda else torch.float32
    shape_list = a.shapes if a.shapes is not None else ("S3,S2,S1,S4" if a.step else "S1,S2,S4,S3")
    shapes = {k: SHAPES[k] for k in shape_list.split(",")} if cuda else CPU_SHAPE
    if a.step:
        cells = [c for c in a.cells.split(",") if c != "lnlstm"]  # the LN step tiles are not swept
        kinds = (lambda c, d, cu, ll: step_variants(c, d, cu), tile_of, step_runners)
    else:
        cells = a.cells.split(",")
        kinds = (variants, plan_of, lambda c, d, cu: runners(c, d))
    os.makedirs(a.out, exist_ok=True)
    t_end = time.time() + a.budget_s
    rows, skipped = [], []
    machine = (torch.cuda.get_device_name(0) if cuda else "CPU (Triton interpreter)")
    import triton

    what = "step-path tiles, CUDA-graph replays" if a.step else "persistent plans"
    head = (f"persistent_tune ({what}): {machine}, torch {torch.__version__}, Triton {triton.__version__}, "
            f"{a.dtype if cuda else 'fp32'}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(head, flush=True)
    order = _order(cells, list(shapes), STEP_PRIORITY if a.step else PRIORITY)
    state = {}  # (cell, shape, direction) -> the default's plan and result, from pass 0
    for pass_no in (0, 1):
        for cell, sname in order:
            B, T, H = shapes[sname]
            d = None
            for direction in ("fwd", "bwd"):
                st = state.setdefault((cell, sname, direction), {"ref": None, "plan": None})
                for vname, apply, undo in kinds[0](cell, direction, cuda, not a.no_ll):
                    if _pass_of(vname, a.step) != pass_no:
                        continue
                    if time.time() > t_end:
                        skipped.append(f"{cell} {sname} {direction} {vname}: past the budget")
                        continue
                    if pass_no == 1 and st["ref"] is None:
                        skipped.append(f"{cell} {sname} {direction} {vname}: no timed default")
                        continue
                    if d is None:
                        d = make_inputs(cell, B, T, H, dtype, dev)
                    rows.append(_run_variant(cell, sname, direction, vname, apply, undo, d, st, dtype, dev, cuda,
                                             kinds[1], kinds[2]))
                    print(_md(rows[-1]), flush=True)  # progress: the table's row
                    # rewritten after every row: a stage killed by its timeout (a variant that
                    # hangs) still leaves what was measured before it
                    _write(a.out, head, rows, skipped, partial=True)
    text = _write(a.out, head, rows, skipped)
    print("\n" + text)
    # exit 1 on a wrong result or a variant that raised (a grid that does not fit is no failure)
    bad = [r for r in rows if r.get("ok") is False or "error" in r]
    return 1 if bad else 0


def _pass_of(vname, step=False) -> int:
    """Pass 0: the default and the structural variants (sync, W_hh placement, barrier order, the
    LN barrier counts) of every case in the order of need; pass 1: the BLOCK_H x warps grid.
    The step tiles: one pass."""
    return 1 if vname.startswith("BLOCK_H=") and not step else 0


def _run_variant(cell, sname, direction, vname, apply, undo, d, st, dtype, dev, cuda, plan_fn=None,
                 runners_fn=None) -> dict:
    """One row: plan, result against the default's (st: its plan and result, set by the default),
    time, registers; a variant that raises is reported in the row. plan_fn / runners_fn: the
    persistent plans' (plan_of, runners) unless given (the step tiles')."""
    from fused_rnn.kernels import persistent as P

    plan_fn = plan_fn or plan_of
    runners_fn = runners_fn or (lambda c, dd, cu: runners(c, dd))
    B, T, H = d["x"].shape[1], d["x"].shape[0], d["w_hh"].shape[1]
    row = {"cell": cell, "shape": sname, "B": B, "T": T, "H": H, "direction": direction, "variant": vname}
    apply()
    try:
        pl, why = plan_fn(cell, direction, B, H, dtype, dev)
        row["plan"] = str(pl) if pl is not None else None
        if vname == "default":
            st["plan"] = row["plan"]
        if pl is None:
            row["skip"] = f"no plan: {why}"
        elif vname != "default" and row["plan"] == st["plan"] and (cell != "lnlstm" or vname == LL_VARIANT):
            row["skip"] = "the default's plan (timed above)"
        else:
            fwd, bwd, _ = runners_fn(cell, d, cuda)
            fn = fwd if direction == "fwd" else bwd
            res = fn()
            key = res[0] if res[0] is not None else res[1]  # out / dx
            if st["ref"] is None:
                st["ref"] = key.detach().clone()
            row["rel_err_vs_default"] = rel(key, st["ref"])
            row["ok"] = row["rel_err_vs_default"] <= TOL[dtype]
            row["ms"] = time_ms(fn, cuda)
            launch = {}
            if plan_fn is plan_of:  # the step launches record no registers
                launch = P.LAST_LAUNCH.get(f"ln_lstm_{direction}" if cell == "lnlstm" else f"{cell}_{direction}") or {}
            row["regs"], row["spills"] = launch.get("n_regs"), launch.get("n_spills")
    except Exception as e:  # reported in the table, not hidden: the sweep goes on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        undo()
    return row


def _write(out, head, rows, skipped, partial=False) -> str:
    md = [head, "", "| cell | shape | dir | variant | plan | ms | rel err vs default | regs / spills |",
          "|---|---|---|---|---|---|---|---|"] + [_md(r) for r in rows]
    md += ["", "Best per cell, shape and direction (ratio to the default variant):"]
    md += _best(rows)
    if skipped:
        md += ["", "Not run (budget): " + "; ".join(skipped)]
    if partial:
        md += ["", "PARTIAL: the sweep was still running when this was written (killed or hung after "
                   "the last row?)"]
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "tune.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "tune.json"), "w") as f:
        json.dump({"machine": head, "rows": rows, "skipped": skipped, "partial": partial}, f, indent=1)
    return text


# (cell, shape) in the order of need when the budget runs short: the LSTM and the RNN at S1 (T2
# and T5 are tightest there, and the LL and solo variants matter most there: latency-bound
# steps), the LSTM's other shapes (T1, T2), the LN-LSTM at S1 (T4), then the rest
PRIORITY = [("lstm", "S1"), ("rnn", "S1"), ("lstm", "S2"), ("lstm", "S4"), ("lnlstm", "S1"), ("lstm", "S3"),
            ("lnlstm", "S2"), ("rnn", "S2"), ("rnn", "S4"), ("rnn", "S3"), ("lnlstm", "S4"), ("lnlstm", "S3")]


# the step tiles: where the row block is in question first (S3, then S2), then the small batches
STEP_PRIORITY = [("lstm", "S3"), ("rnn", "S3"), ("lstm", "S2"), ("rnn", "S2"), ("lstm", "S1"), ("rnn", "S1"),
                 ("lstm", "S4"), ("rnn", "S4")]


def _order(cells, shapes, priority=None):
    priority = PRIORITY if priority is None else priority
    want = [(c, s) for c in cells for s in shapes]
    return [p for p in priority if p in want] + [p for p in want if p not in priority]


def _md(r) -> str:
    if "error" in r or "skip" in r:
        why = f"ERROR {r['error']}" if "error" in r else f"not run: {r['skip']}"
        return f"| {r['cell']} | {r['shape']} | {r['direction']} | {r['variant']} | – | – | {why} | – |"
    flag = "" if r["ok"] else " WRONG"
    regs = "–" if r.get("regs") is None else f"{r['regs']} / {r['spills']}"
    return (f"| {r['cell']} | {r['shape']} | {r['direction']} | {r['variant']} | {r['plan']} | {r['ms']:.3f} | "
            f"{r['rel_err_vs_default']:.1e}{flag} | {regs} |")


def _best(rows):
    out = []
    groups = {}
    for r in rows:
        groups.setdefault((r["cell"], r["shape"], r["direction"]), []).append(r)
    for (cell, shape, direction), rs in groups.items():
        good = [r for r in rs if r.get("ok")]
        default = next((r for r in good if r["variant"] == "default"), None)
        if not good or default is None:
            out.append(f"- {cell} {shape} {direction}: no timed default")
            continue
        best = min(good, key=lambda r: r["ms"])
        out.append(f"- {cell} {shape} {direction}: {best['variant']} {best['ms']:.3f} ms "
                   f"({best['ms'] / default['ms']:.2f}x the default's {default['ms']:.3f} ms; plan {best['plan']})")
    return out


if __name__ == "__main__":
    sys.exit(main())
