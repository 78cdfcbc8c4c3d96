"""Write the measured path policy (fused_rnn/data/path_policy.json's format) for the card a
`fused-rnn bench` run ran on.

    python bench/write_policy.py IN_BENCH_JSON OUT_POLICY_JSON

For each cell, dtype and shape class (fused_rnn._paths.shape_class) of the run's fused rows on
our paths (the "triton" row is the step path, "graph", "persistent"), the fastest: by fwd+bwd
time where any row of the shape has one (a path whose backward failed does not win), else by
fwd time; a shape timed on fewer than two paths says nothing and is left out. Where several
bench shapes fall in one class, the path that won most of them (ties: the smallest total time
over the class). Rows that fell back to the reference path are ignored.
The "triton" row runs "auto": run the bench with FUSED_RNN_PATH=step (graph and persistent
rows ask for their path explicitly) or on a card the table does not list yet.

If OUT exists its other devices are kept and this card's entries replace its old ones; the
result is validated (fused_rnn._paths.validate_policy) before it is written. Exit status 1
when the run was not on a CUDA GPU or measured no comparison.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from fused_rnn import _paths

METHOD_PATH = {"triton": "step", "graph": "graph", "persistent": "persistent"}


def _kernels(row: dict) -> Optional[str]:
    """The row's note of what its kernels took (step tiles or persistent plans), if any."""
    return next((n for n in row.get("notes", []) if n.startswith(("plans:", "step tiles"))), None)


def _winner(rows: List[dict]) -> Optional[Tuple[str, str, Dict[str, float], Optional[str]]]:
    """(path, mode key, {path: ms}, its kernels) of the fastest row of one shape, or None under
    two timings."""
    key = "fwdbwd_ms" if any(r.get("fwdbwd_ms") is not None for r in rows) else "fwd_ms"
    timed = {METHOD_PATH[r["method"]]: r for r in rows if r.get(key) is not None}
    if len(timed) < 2:
        return None
    best = min(timed, key=lambda p: timed[p][key])
    return best, key, {p: r[key] for p, r in timed.items()}, _kernels(timed[best])


def policy_entries(data: dict) -> Dict[str, Dict[str, Dict[str, dict]]]:
    """{cell: {dtype: {shape class: entry}}} from a bench JSON's results; an entry holds the path
    and per bench shape the mode compared, every path's time, the fastest and its kernels (the
    row's step tiles or persistent plans, as the bench noted them)."""
    by_shape: Dict[tuple, List[dict]] = {}
    for r in data.get("results", []):
        if (r.get("kind") == "fused" and r.get("method") in METHOD_PATH and not r.get("fallback")
                and r.get("cell") in _paths.POLICY_CELLS and r.get("dtype") in _paths.POLICY_DTYPES.values()):
            by_shape.setdefault((r["cell"], r["dtype"], r["shape"], r["B"], r["H"]), []).append(r)
    classes: Dict[tuple, List[tuple]] = {}
    for (cell, dtype, shape, B, H), rows in sorted(by_shape.items()):
        won = _winner(rows)
        if won is not None:
            classes.setdefault((cell, dtype, _paths.shape_class(B, H)), []).append((shape, B, H, *won))
    out: Dict[str, Dict[str, Dict[str, dict]]] = {}
    for (cell, dtype, sc), shapes in sorted(classes.items()):
        wins: Dict[str, int] = {}
        total: Dict[str, float] = {}
        for _s, _b, _h, path, _key, ms, _k in shapes:
            wins[path] = wins.get(path, 0) + 1
        for p in wins:  # a path not timed on every shape of the class loses a tie
            total[p] = sum(ms.get(p, float("inf")) for *_, ms, _k in shapes)
        best = min(wins, key=lambda p: (-wins[p], total[p]))
        out.setdefault(cell, {}).setdefault(dtype, {})[sc] = {
            "path": best,
            "measured": [{"shape": f"{s} (B{b},H{h})", "mode": "fwd+bwd" if key == "fwdbwd_ms" else "fwd",
                          "ms": {p: round(v, 4) for p, v in sorted(ms.items())}, "fastest": p_best,
                          **({"kernels": k} if k else {})}
                         for s, b, h, p_best, key, ms, k in shapes],
        }
    return out


def device_policy(data: dict) -> Tuple[str, dict]:
    """(the card's name, its table entry: source and entries) from a bench JSON."""
    m = data.get("machine", {})
    if m.get("device") != "cuda" or not m.get("gpu"):
        raise ValueError("the bench run was not on a CUDA GPU: nothing to write")
    entries = policy_entries(data)
    if not entries:
        raise ValueError(f"the bench run on {m['gpu']} timed no shape on two or more of our paths "
                         "(run it with --paths triton,graph,persistent)")
    source = {"run": f"fused-rnn bench ({data.get('config', {}).get('mode', '?')}), git {m.get('git')}",
              "date": m.get("date"), "torch": m.get("torch"), "triton": m.get("triton"), "cuda": m.get("cuda")}
    return m["gpu"], {"source": source, "entries": entries}


def merge(table: Optional[dict], gpu: str, dev: dict) -> dict:
    """``table`` (or a new empty one) with ``gpu``'s entry replaced by ``dev``, validated."""
    table = dict(table) if table else {"format": _paths.POLICY_FORMAT, "devices": {}}
    table["devices"] = {**table.get("devices", {}), gpu: dev}
    table["status"] = "measured on: " + "; ".join(
        f"{name} ({d['source']['date']})" for name, d in sorted(table["devices"].items()))
    return _paths.validate_policy(table)


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src, dst = argv
    with open(src) as f:
        data = json.load(f)
    try:
        gpu, dev = device_policy(data)
    except ValueError as e:
        print(f"write_policy: {e}", file=sys.stderr)
        return 1
    old = None
    if os.path.exists(dst):
        with open(dst) as f:
            old = json.load(f)
    table = merge(old, gpu, dev)
    with open(dst, "w") as f:
        json.dump(table, f, indent=1, sort_keys=False)
        f.write("\n")
    n = sum(len(s) for d in dev["entries"].values() for s in d.values())
    print(f"write_policy: {n} entries for {gpu} -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
