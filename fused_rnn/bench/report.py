"""The benchmark's report: the machine it ran on, the markdown table with its speed-up columns,
the targets' pass/miss lines, the fastest-path lines, the bar chart, and the files
(bench.json, bench.md, bench.png) a run writes or ``--render`` rewrites."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from typing import Dict, List, Optional, Sequence

import torch

from .._backend import interpreter_on
from .._version import __version__
from .cases import CELL_LABEL, CELLS, DTYPES, KIND_ORDER, MODE_KEY, SEED_DTYPE, short_error
from .targets import TARGETS, ordered_shapes


# --------------------------------------------------------------------------------- machine info
def _cudnn_version() -> Optional[str]:
    try:
        v = torch.backends.cudnn.version()
    except Exception:
        return None
    if not v:
        return None
    if v >= 90000:  # cuDNN 9: major*10000 + minor*100 + patch
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"  # cuDNN 8: major*1000 + minor*100 + patch


def _git_rev() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                             capture_output=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, text=True, capture_output=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


def machine_info(device: torch.device) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = None
    cuda = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device.type,
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version() if cuda else None,
        "python": platform.python_version(),
        "fused_rnn": __version__,
        "git": _git_rev(),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "triton_interpret": interpreter_on(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict) -> str:
    if m.get("device") == "cuda":
        where = f"{m.get('gpu')} | CUDA {m.get('cuda')} | cuDNN {m.get('cudnn') or 'n/a'}"
    else:
        where = (f"CPU only, no CUDA GPU ({m.get('cpu')}, {m.get('cpu_count')} cores) | "
                 f"cuDNN n/a | TRITON_INTERPRET={'1' if m.get('triton_interpret') else '0'}")
    git = f" (git {m['git']})" if m.get("git") else ""
    return (f"machine: {where} | torch {m.get('torch')} | triton {m.get('triton')} | "
            f"fused_rnn {m.get('fused_rnn')}{git} | {m.get('date')}")


# ------------------------------------------------------------------------------------ rendering
def _fmt_ms(v) -> str:
    return "–" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


def _fmt_x(base, v) -> str:
    if base is None or v is None or v <= 0:
        return "–"
    x = base / v
    return f"{x:.2f}×" if x < 10 else (f"{x:.1f}×" if x < 100 else f"{x:.0f}×")


def _method_label(r: dict) -> str:
    if r["kind"] == "fused":
        return f"fused_rnn {r['method']}"
    if r["kind"] == "nn":
        return "cuDNN" if r["method"] == "cudnn" else "torch.nn (CPU)"
    if r["kind"] == "reference":
        return "reference loop"
    return "torch.compile cell"


def sort_records(records: Sequence[dict]) -> List[dict]:
    cells = {c: i for i, c in enumerate(CELLS)}
    shapes = {s: i for i, s in enumerate(ordered_shapes(records))}
    dts = {d: i for i, d in enumerate(DTYPES)}
    return sorted(records, key=lambda r: (cells.get(r["cell"], 9), shapes[r["shape"]],
                                          KIND_ORDER[r["kind"]], r["method"],
                                          dts.get(r["dtype"], -1)))


def render_table(data: dict) -> str:
    recs = data["results"]
    base_dtype = data["config"]["base_dtype"]
    cuda = data["machine"].get("device") == "cuda"
    base_name = f"cuDNN {base_dtype}" if cuda else f"torch.nn {base_dtype} (CPU)"
    marks: Dict[tuple, Dict[str, bool]] = {}
    for t in data.get("targets", []):
        k = (t["cell"], t["shape"], t["dtype"], t["method"])
        marks.setdefault(k, {})
        marks[k][t["id"]] = marks[k].get(t["id"], True) and t["passed"]
    head = ("| cell | shape (B,T,H) | dtype | method | fwd ms | fwd+bwd ms | peak MiB f+b | "
            f"× {base_name} (fwd / f+b) | × reference loop (fwd / f+b) | targets | notes |")
    lines = [head, "|" + "---|" * 11]
    for r in sort_records(recs):
        bcell = "lstm" if r["cell"] == "lnlstm" else r["cell"]
        base = next((b for b in recs if b["kind"] == "nn" and b["cell"] == bcell
                     and b["shape"] == r["shape"] and b["dtype"] == base_dtype), None)
        refs = [b for b in recs if b["kind"] == "reference" and b["cell"] == r["cell"]
                and b["shape"] == r["shape"]]
        # the reference loop in the row's dtype, else in the seed's
        ref = next((b for b in refs if b["dtype"] == r["dtype"]),
                   next((b for b in refs if b["dtype"] == SEED_DTYPE), None))
        xb = " / ".join(_fmt_x(base and base[k], r[k]) for k in MODE_KEY.values())
        if r["cell"] == "lnlstm" and base and xb != "– / –":
            xb += " †"
        xr = " / ".join(_fmt_x(ref and ref[k], r[k]) for k in MODE_KEY.values())
        mem = "–" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:.0f}"
        tm = marks.get((r["cell"], r["shape"], r["dtype"], r["method"]), {})
        tcol = " ".join(f"{k} {'✓' if v else '✗'}" for k, v in sorted(tm.items()))
        notes = list(r.get("notes", []))
        slow = {m: t for m, t in r.get("timer", {}).items() if "do_bench" not in t and cuda}
        notes += [f"{m}: {t}" for m, t in slow.items()]
        if r["status"] not in ("ok", "n/a"):
            notes.insert(0, r["status"])
        shape = f"{r['shape']} ({r['B']},{r['T']},{r['H']})"
        f_ms, fb_ms = ("n/a", "n/a") if r["status"] == "n/a" else (
            _fmt_ms(r["fwd_ms"]), _fmt_ms(r["fwdbwd_ms"]))
        lines.append(f"| {CELL_LABEL.get(r['cell'], r['cell'])} | {shape} | {r['dtype']} | "
                     f"{_method_label(r)} | {f_ms} | {fb_ms} | "
                     f"{mem} | {xb} | {xr} | {tcol} | {'; '.join(notes).replace('|', '/')} |")
    return "\n".join(lines)


def render_targets(data: dict) -> str:
    if data["machine"].get("device") != "cuda":
        return ("Targets: not evaluated: they are defined against cuDNN on a CUDA GPU, and this "
                "run had none.")
    res = data.get("targets", [])
    lines = ["Targets (pass/miss where this run has the data; ratios are of medians from this run):"]
    for tid, desc in TARGETS.items():
        mine = [t for t in res if t["id"] == tid]
        if not mine:
            lines.append(f"- {tid} {desc}: not evaluated (no data in this run)")
            continue
        n_pass = sum(t["passed"] for t in mine)
        lines.append(f"- {tid} {desc}: {n_pass}/{len(mine)} pass")
        for t in mine:
            lines.append(f"  - {'PASS' if t['passed'] else 'MISS'} {t['shape']} {t['mode']}: "
                         f"{t['text']}")
    return "\n".join(lines)


def render_fastest_paths(data: dict) -> str:
    """Which fused path was fastest for each cell, shape, dtype and mode, by how much over the
    next one: the evidence for fused_rnn/_paths.py's "auto" policy (empty when the run timed
    fewer than two paths anywhere)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in data["results"]:
        if r["kind"] == "fused" and not r.get("fallback", False):
            groups.setdefault((r["cell"], r["shape"], r["dtype"]), []).append(r)
    lines = []
    for (cell, shape, dtype), rs in groups.items():
        for mode, key in MODE_KEY.items():
            timed = sorted((r for r in rs if r.get(key) is not None), key=lambda r: r[key])
            if len(timed) < 2:
                continue
            best, second = timed[0], timed[1]
            lines.append(f"- {CELL_LABEL.get(cell, cell)} {shape} {dtype} {mode}: {best['method']} "
                         f"{best[key]:.4g} ms, {second[key] / best[key]:.2f}× faster than "
                         f"{second['method']} ({second[key]:.4g} ms)")
    if not lines:
        return ""
    return "\n".join(["Fastest path (for the auto policy in fused_rnn/_paths.py):"] + lines)


def render_markdown(data: dict) -> str:
    cfg, m = data["config"], data["machine"]
    cuda = m.get("device") == "cuda"
    timing = (f"triton.testing.do_bench median (warmup {cfg['warmup_ms']} ms, rep {cfg['rep_ms']} "
              f"ms); a call slower than {cfg['slow_ms']:g} ms: wall-clock median of ≤ 10"
              if cuda else "time.perf_counter wall-clock medians (CPU mode)")
    table = render_table(data)
    parts = [
        f"# fused_rnn benchmark ({cfg['mode']})",
        "",
        machine_line(m),
        "",
        f"Timing: {timing}. fwd runs under torch.no_grad(); fwd+bwd is out.sum().backward() "
        "with x and every weight requiring grad. Speed-up = baseline time / row time "
        "(> 1: the row is faster). Peak MiB: torch.cuda.max_memory_allocated over one fwd+bwd "
        "after a reset, inputs and weights included.",
        "",
        table,
        "",
    ]
    if "†" in table:
        parts.append("† LN-LSTM has no cuDNN kernel: its speed-up column compares against "
                     f"{'cuDNN' if cuda else 'torch.nn'}'s plain LSTM.")
    if cuda and m.get("tf32_cudnn"):
        parts.append("cuDNN fp32 runs TF32 (torch.backends.cudnn.allow_tf32, the torch default).")
    if data.get("interrupted"):
        parts.append(f"**Run cut short:** {data['interrupted']}; the cases not reached are missing.")
    fastest = render_fastest_paths(data)
    if fastest:
        parts += ["", fastest]
    parts += ["", render_targets(data), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ plot and files
def save_plot(data: dict, path: str) -> Optional[str]:
    """A bar chart per cell and mode (log scale). Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib not importable ({short_error(e)}): plot skipped"
    recs = [r for r in data["results"] if r["fwd_ms"] is not None or r["fwdbwd_ms"] is not None]
    if not recs:
        return "no timings to plot: plot skipped"
    cells = [c for c in CELLS if any(r["cell"] == c for r in recs)]
    shapes = ordered_shapes(sort_records(recs))
    series = []
    for r in sort_records(recs):
        s = (_method_label(r), r["dtype"])
        if s not in series:
            series.append(s)
    fig, axes = plt.subplots(2, len(cells), figsize=(5.5 * len(cells), 7.5), squeeze=False)
    width = 0.8 / max(1, len(series))
    cmap = plt.get_cmap("tab20")
    for ci, cell in enumerate(cells):
        for mi, (mode, key) in enumerate(MODE_KEY.items()):
            ax = axes[mi][ci]
            for si, (label, dt) in enumerate(series):
                xs, ys = [], []
                for xi, sh in enumerate(shapes):
                    r = next((r for r in recs if r["cell"] == cell and r["shape"] == sh
                              and _method_label(r) == label and r["dtype"] == dt), None)
                    if r is not None and r[key] is not None:
                        xs.append(xi + (si - (len(series) - 1) / 2) * width)
                        ys.append(r[key])
                if xs:
                    ax.bar(xs, ys, width, label=f"{label} {dt}", color=cmap(si % 20))
            ys_all = [r[key] for r in recs if r["cell"] == cell and r[key]]
            if ys_all:  # log-scale bars need a floor under the smallest one
                ax.set_ylim(bottom=min(ys_all) / 2)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes)
            ax.set_yscale("log")
            ax.set_title(f"{CELL_LABEL[cell]} {mode}")
            ax.set_ylabel("ms (log)")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8)
    fig.suptitle(machine_line(data["machine"]), fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(data: dict, out_dir: str, plot: bool = True) -> List[str]:
    """bench.json, bench.md and (if plot) bench.png in out_dir; returns messages for stderr."""
    os.makedirs(out_dir, exist_ok=True)
    msgs = []
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(render_markdown(data))
    if plot:
        why = save_plot(data, os.path.join(out_dir, "bench.png"))
        if why:
            msgs.append(why)
    return msgs
