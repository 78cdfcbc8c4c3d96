"""The CPU table: torch.nn's layers against fused_rnn's (``backend="auto"``, which on CPU tensors
runs torch's ATen ops for what torch.nn computes, fused_rnn/aten.py, and the whole-sequence
route of fused_rnn/cpu_lstm.py for the layer-norm LSTM), the plain LSTM through that
whole-sequence route (column "whole-seq", padded LSTM rows: does it beat ATen?) and, on
request, the reference loop, at whole-layer shapes (input size, layers, directions,
PackedSequence).

Run: ``fused-rnn bench --device cpu --cpu-table`` (or ``python -m fused_rnn.bench.cpu``).
Forward+backward (a sum of the output and final states, gradients of input and weights), the
same weights for every column, ``--threads`` threads (default 1), the median of ``--reps`` runs
after one warm-up; the columns of a row run interleaved, so that a load on the machine hits
them alike. Timing only: parity is tests/test_aten_route.py's.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from fused_rnn.cpu_lstm import lstm_sequence_cpu


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # LSTM | RNN
    B: int
    T: int
    I: int
    H: int
    kw: Dict[str, object] = field(default_factory=dict)
    packed: bool = False  # lengths T, T-1, ... (cycled down to T/2), enforce_sorted=False
    layer_norm: bool = False  # fused_rnn only: torch.nn's column runs the plain LSTM


ROWS: List[Row] = [  # issue 21's table, and a PackedSequence and a layer-norm row
    Row("LSTM B16 T128 I128 H256", "LSTM", 16, 128, 128, 256),
    Row("LSTM B64 T64 I256 H512", "LSTM", 64, 64, 256, 512),
    Row("RNN B16 T128 I128 H256", "RNN", 16, 128, 128, 256),
    Row("LSTM 2 layers, bidirectional, B8 T200 I64 H128", "LSTM", 8, 200, 64, 128,
        {"num_layers": 2, "bidirectional": True}),
    Row("LSTM 2 layers, bidirectional, packed, B8 T200 I64 H128", "LSTM", 8, 200, 64, 128,
        {"num_layers": 2, "bidirectional": True}, packed=True),
    Row("layer-norm LSTM B16 T128 I128 H256 (torch.nn: plain LSTM)", "LSTM", 16, 128, 128, 256,
        layer_norm=True),
    Row("layer-norm LSTM B64 T64 I256 H512 (torch.nn: plain LSTM)", "LSTM", 64, 64, 256, 512,
        layer_norm=True),
    Row("layer-norm LSTM 2 layers, bidirectional, B8 T200 I64 H128 (torch.nn: plain LSTM)", "LSTM", 8, 200,
        64, 128, {"num_layers": 2, "bidirectional": True}, layer_norm=True),
]
WHOLE_SEQ = "whole-seq"


class WholeSequence(nn.Module):
    """A plain fused_rnn.LSTM's layers and directions through cpu_lstm's whole-sequence Function
    (padded, time-major input, zero initial state): the "beyond torch.nn" candidate."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m, hs, cs = self.layer, [], []
        z = x.new_zeros(x.shape[1], m.hidden_size)
        for l in range(m.num_layers):
            outs = []
            for d in range(2 if m.bidirectional else 1):
                w = [getattr(m, n) for n in m._layer_param_names(l, d)[:4]]
                out, h, c = lstm_sequence_cpu(x if d == 0 else x.flip(0), z, z, *w, None, None)
                outs.append(out if d == 0 else out.flip(0))
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, -1)
        return x, (torch.stack(hs), torch.stack(cs))


def _modules(row: Row, reference: bool):
    torch.manual_seed(0)
    ref = getattr(nn, row.kind)(row.I, row.H, **row.kw)
    extra = {"layer_norm": True} if row.layer_norm else {}
    mods = {"torch.nn": ref,
            "fused_rnn (auto)": getattr(fused_rnn, row.kind)(row.I, row.H, **row.kw, **extra)}
    if row.kind == "LSTM" and not (row.packed or row.layer_norm):
        mods[WHOLE_SEQ] = WholeSequence(getattr(fused_rnn, row.kind)(row.I, row.H, **row.kw))
    if reference:
        mods["reference"] = getattr(fused_rnn, row.kind)(row.I, row.H, **row.kw, **extra,
                                                         backend="reference")
    for name, m in mods.items():
        if name == WHOLE_SEQ:
            m.layer.load_state_dict(ref.state_dict())
        elif m is not ref:
            m.load_state_dict(ref.state_dict(), strict=not row.layer_norm)
    return mods


def _input(row: Row):
    x = torch.randn(row.T, row.B, row.I, requires_grad=True)
    if not row.packed:
        return x
    lengths = torch.tensor([row.T - (i * row.T // (2 * row.B)) for i in range(row.B)])
    return pack_padded_sequence(x, lengths[torch.randperm(row.B)], enforce_sorted=False)


def _step(m, inp):
    out, state = m(inp)
    out = out.data if not isinstance(out, torch.Tensor) else out
    states = state if isinstance(state, tuple) else (state,)
    (out.sum() + sum(s.sum() for s in states)).backward()
    for p in m.parameters():
        p.grad = None


def time_row(row: Row, reps: int = 5, reference: bool = False) -> Dict[str, float]:
    """Median wall-clock ms of one forward+backward per column, the columns interleaved."""
    mods = _modules(row, reference)
    times: Dict[str, List[float]] = {n: [] for n in mods}
    for rep in range(reps + 1):  # rep 0: warm-up
        for name, m in mods.items():
            inp = _input(row)  # (the packing, outside the timed call)
            t0 = time.perf_counter()
            _step(m, inp)
            if rep:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def machine_line(threads: int) -> str:
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} of "
            f"{__import__('os').cpu_count()} cores used ({threads} thread{'s' * (threads != 1)}), "
            f"torch {torch.__version__}, fused_rnn {fused_rnn.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def render(results, reference: bool) -> str:
    cols = ["torch.nn", "fused_rnn (auto)", WHOLE_SEQ] + (["reference"] if reference else [])
    head = "| case | " + " | ".join(f"{c} ms" for c in cols) + " | nn / fused (speed ratio) |"
    lines = [head, "|---" * (len(cols) + 2) + "|"]
    for row, t in results:
        ratio = t["torch.nn"] / t["fused_rnn (auto)"]
        cells = [f"{t[c]:.1f}" if c in t else "–" for c in cols]
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def run(rows: Sequence[Row] = ROWS, reps: int = 5, threads: int = 1, reference: bool = False,
        out=sys.stdout) -> list:
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        print(machine_line(threads) + f"; fwd+bwd, median of {reps}", file=out)
        results = []
        for row in rows:
            results.append((row, time_row(row, reps, reference)))
            print(f"  {row.label}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in results[-1][1].items()),
                  file=sys.stderr)
        print(render(results, reference), file=out)
        return results
    finally:
        torch.set_num_threads(saved)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fused-rnn bench --device cpu --cpu-table", description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed runs per column (the median; default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--reference", action="store_true", help="also time backend='reference' (slow)")
    p.add_argument("--rows", default=None, help="comma-separated row numbers (0-based) to run")
    a = p.parse_args(argv)
    rows = ROWS if a.rows is None else [ROWS[int(i)] for i in a.rows.split(",")]
    run(rows, a.reps, a.threads, a.reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
