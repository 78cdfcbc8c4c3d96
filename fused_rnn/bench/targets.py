"""The project's speed and memory targets (T1-T6), judged pass/miss from a run's own records
(CUDA records only; a fused row that fell back to the reference path counts for none)."""
from __future__ import annotations

from typing import List, Optional, Sequence

from .cases import DTYPES, MODE_KEY, SHAPES

TARGETS = {
    "T1": "LSTM bf16 ≤ 1/3 of cuDNN bf16 at S1, S2, S4; ≤ 0.55× at S3",
    "T2": "LSTM, our fastest dtype ≤ cuDNN fp16, every shape",
    "T3": "LSTM ≥ 50× faster than the reference loop in the same dtype at S1, S2, S4",
    "T4": "layer-norm LSTM ≤ 1.5× our plain LSTM (same shape, dtype)",
    "T5": "tanh RNN, our fastest dtype ≤ cuDNN nn.RNN fp16",
    "T6": "LSTM peak memory of fwd+bwd at S2 ≤ cuDNN's (same dtype)",
}
T1_LIMIT = {"S1": 1 / 3, "S2": 1 / 3, "S3": 0.55, "S4": 1 / 3}
T3_SHAPES = ("S1", "S2", "S4")
T3_SPEEDUP = 50.0
T4_LIMIT = 1.5
_EPS = 1e-9  # a ratio equal to its limit passes


def _usable(r: dict, mode_key: str) -> bool:
    return (r.get("device") == "cuda" and r.get(mode_key) is not None
            and not r.get("fallback", False))


def _ours(recs, cell, shape, mode_key, dtype=None):
    """The fastest fused record (any path; any dtype unless given) with a time for mode_key."""
    c = [r for r in recs if r["kind"] == "fused" and r["cell"] == cell and r["shape"] == shape
         and (dtype is None or r["dtype"] == dtype) and _usable(r, mode_key)]
    return min(c, key=lambda r: r[mode_key]) if c else None


def _find(recs, kind, cell, shape, dtype, mode_key):
    for r in recs:
        if (r["kind"] == kind and r["cell"] == cell and r["shape"] == shape
                and r["dtype"] == dtype and _usable(r, mode_key)):
            return r
    return None


def ordered_shapes(recs) -> List[str]:
    """The named shapes in S1..S4 order, then the custom ones in the order they appear."""
    seen: List[str] = []
    for r in recs:
        if r["shape"] not in seen:
            seen.append(r["shape"])
    named = [n for n in SHAPES if n in seen]
    return named + [n for n in seen if n not in SHAPES]


def evaluate_targets(records: Sequence[dict]) -> List[dict]:
    """Pass/miss of each target wherever its data is present (CUDA records only).

    Each result: id, shape, mode, passed, value (a ratio; for T3 the speed-up), limit, text, and
    the record it judges (``cell``/``dtype``/``method``), so the table can mark that row."""
    recs = list(records)
    out: List[dict] = []

    def add(tid, shape, mode, ours, value, limit, passed, text):
        out.append({"id": tid, "shape": shape, "mode": mode, "cell": ours["cell"],
                    "dtype": ours["dtype"], "method": ours["method"], "value": value,
                    "limit": limit, "passed": bool(passed), "text": text})

    def who(r):
        return f"{r['method']} {r['dtype']}"

    def at_most(tid, shape, mode, key, ours, base, limit: Optional[float], ours_name, base_name):
        """A time ratio ours / base that passes at or under ``limit``."""
        if limit is None or not ours or not base:
            return
        v = ours[key] / base[key]
        add(tid, shape, mode, ours, v, limit, v <= limit + _EPS,
            f"{ours_name}{who(ours)} {ours[key]:.4g} ms / {base_name} {base[key]:.4g} ms = "
            f"{v:.3f}× (limit ≤ {limit:.3g}×)")

    for mode, key in MODE_KEY.items():
        for shape in ordered_shapes(recs):
            # T1: LSTM bf16 against cuDNN bf16.
            at_most("T1", shape, mode, key, _ours(recs, "lstm", shape, key, "bf16"),
                    _find(recs, "nn", "lstm", shape, "bf16", key), T1_LIMIT.get(shape), "",
                    "cuDNN bf16")
            # T2: our fastest dtype against cuDNN fp16.
            at_most("T2", shape, mode, key, _ours(recs, "lstm", shape, key),
                    _find(recs, "nn", "lstm", shape, "fp16", key), 1.0, "", "cuDNN fp16")
            # T3: against the reference loop in the same dtype.
            for dt in DTYPES:
                mine = _ours(recs, "lstm", shape, key, dt)
                base = _find(recs, "reference", "lstm", shape, dt, key)
                if shape in T3_SHAPES and mine and base:
                    v = base[key] / mine[key]
                    add("T3", shape, mode, mine, v, T3_SPEEDUP, v >= T3_SPEEDUP - _EPS,
                        f"reference {dt} {base[key]:.4g} ms / {who(mine)} {mine[key]:.4g} ms = "
                        f"{v:.1f}× faster (need ≥ {T3_SPEEDUP:g}×)")
            # T4: layer-norm LSTM against our plain LSTM, per dtype.
            for dt in DTYPES:
                plain = _ours(recs, "lstm", shape, key, dt)
                at_most("T4", shape, mode, key, _ours(recs, "lnlstm", shape, key, dt), plain,
                        T4_LIMIT, "LN ", f"plain {who(plain)}" if plain else "")
            # T5: tanh RNN, our fastest dtype against cuDNN nn.RNN fp16.
            at_most("T5", shape, mode, key, _ours(recs, "rnn", shape, key),
                    _find(recs, "nn", "rnn", shape, "fp16", key), 1.0, "", "cuDNN nn.RNN fp16")
    # T6: peak memory of fwd+bwd at S2, per dtype, our smallest path against cuDNN.
    for dt in DTYPES:
        c = [r for r in recs if r["kind"] == "fused" and r["cell"] == "lstm" and r["shape"] == "S2"
             and r["dtype"] == dt and r.get("device") == "cuda" and r.get("peak_mem_bytes")
             and not r.get("fallback", False)]
        base = [r for r in recs if r["kind"] == "nn" and r["cell"] == "lstm" and r["shape"] == "S2"
                and r["dtype"] == dt and r.get("device") == "cuda" and r.get("peak_mem_bytes")]
        if c and base:
            ours = min(c, key=lambda r: r["peak_mem_bytes"])
            b = base[0]["peak_mem_bytes"]
            v = ours["peak_mem_bytes"] / b
            add("T6", "S2", "fwd+bwd", ours, v, 1.0, v <= 1.0 + _EPS,
                f"{who(ours)} {ours['peak_mem_bytes'] / 2**20:.1f} MiB / cuDNN {dt} "
                f"{b / 2**20:.1f} MiB = {v:.3f}× (limit ≤ 1×)")
    return out
