#!/usr/bin/env python3
"""Registers and spills of every step-kernel tile the launchers choose, over a grid of shapes,
compiled for sm_90 on a machine without a GPU (the installed Triton and its bundled ptxas).

    python bench/sm90_tiles.py [--batches 3,16,64,256] [--hidden 16,32,64,100,128,256,512,1024,2048,4096]
                               [--dtypes bf16,fp16,fp32,tf32]

One line per distinct (kernel, direction, dtype, tile, B and H's specialisation): registers,
spilled bytes, the first shape that chose it, compiled as its launch specialises it
(tests/conftest.py compile_sm90: B or H == 1 a constant, divisible by 16 an attribute).
tests/test_sm90_compile.py asserts no spill for a subset in CI; this sweeps the whole grid after
a change to kernels/tiles.py (lstm_blocks, rnn_blocks, gru_blocks) (it takes a few minutes: each tile is one
compile). Exit status 1 if a tile spills, other than the unfused layer-norm
backward of a 4096-unit row (BLOCK_H 4096), which spills at any warp count (kernels.tiles.lstm_blocks).
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="3,16,64,256")
    ap.add_argument("--hidden", default="16,32,64,100,128,256,512,1024,2048,4096")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32,tf32")
    a = ap.parse_args(argv)
    import triton

    from conftest import compile_sm90, ptxas_usage
    from test_sm90_compile import _case, _gru_case
    from fused_rnn.kernels.config import ln_fused_max_h

    print(f"sm90_tiles: Triton {triton.__version__}, torch {torch.__version__}", flush=True)
    seen, bad = set(), []
    for dname in a.dtypes.split(","):
        dt, tf32 = DTYPES[dname], dname == "tf32"
        for B in (int(v) for v in a.batches.split(",")):
            for H in (int(v) for v in a.hidden.split(",")):
                for d in ("fwd", "bwd"):
                    lnf = H <= ln_fused_max_h(dt)
                    kinds = [("lstm", "lstm", True, False), ("lstm-unfused", "lstm", False, False),
                             ("lnlstm" if lnf else "lnlstm-unfused", "lstm", lnf, True),
                             ("rnn", "rnn", True, None), ("rnn-unfused", "rnn", False, None),
                             ("gru", "gru", True, None)]
                    for name, cell, fused, ln in kinds:
                        if cell == "gru":
                            kern, sig, const, nw = _gru_case(d, dt, H, True, B, True, tf32)
                        else:
                            kern, sig, const, nw = _case(cell, d, dt, H, fused, ln, True, B, tf32)
                        tile = (const["BLOCK_B"], const["BLOCK_H"], const["BLOCK_K"], nw)
                        spec = tuple("1" if v == 1 else "D" if v % 16 == 0 else "" for v in (B, H))
                        key = (name, d, dname, tile, spec)
                        if key in seen:
                            continue
                        seen.add(key)
                        usage = ptxas_usage(compile_sm90(kern, sig, const, num_warps=nw))
                        if usage is None:
                            print("this Triton does not expose its ptxas", file=sys.stderr)
                            return 2
                        regs, spill = usage
                        known = name == "lnlstm-unfused" and d == "bwd" and tile[1] >= 4096
                        flag = "" if not spill else ("  spills (known: one 4096-unit row)" if known else "  SPILLS")
                        if spill and not known:
                            bad.append(key)
                        print(f"{name:15} {d} {dname:4} tile {tile[0]}x{tile[1]}x{tile[2]} w{tile[3]:<2} "
                              f"(first at B{B} H{H}): {regs:3} registers, {spill} B spilled{flag}", flush=True)
    print(f"sm90_tiles: {len(seen)} tiles, {len(bad)} spilling outside the known case")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
