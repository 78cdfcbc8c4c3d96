"""The benchmark suite (fused_rnn.bench): its CPU mode, target logic, rendering and arguments.

Everything here runs on the CPU in seconds: `--device cpu` on a tiny shape, and synthetic
records for the GPU-only parts (targets, the GPU table). The GPU run itself is
bench/gpu_check.sh's job.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fused_rnn import bench
from fused_rnn.bench import cases, paths, report, targets, timing
from conftest import INTERPRET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--shape", "2,3,8", "--slow-budget", "0.05"]


def _run(args, tmp_path, capsys):
    rc = bench.main(TINY + args + ["--out", str(tmp_path)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------------ CPU mode
def test_cpu_mode_writes_json_table_and_plot(tmp_path, capsys):
    rc, out, err = _run(["--cells", "lstm,lnlstm,rnn", "--dtypes", "fp32"], tmp_path, capsys)
    assert rc == 0
    assert "no CUDA GPU" in err and "[1/" in err
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {"schema", "machine", "config", "results", "targets", "interrupted",
            "elapsed_s"} <= set(data)
    m = data["machine"]
    assert {"gpu", "torch", "triton", "cudnn", "cuda", "date", "device"} <= set(m)
    assert m["device"] == "cpu" and m["torch"] == torch.__version__
    assert data["config"]["shapes"] == {"B2T3H8": [2, 3, 8]}
    assert data["targets"] == []  # targets are defined against cuDNN on a GPU
    keys = {"cell", "shape", "B", "T", "H", "dtype", "kind", "method", "device", "status",
            "fwd_ms", "fwdbwd_ms", "timer", "peak_mem_bytes", "notes"}
    by = {(r["cell"], r["method"]): r for r in data["results"]}
    for r in data["results"]:
        assert keys <= set(r)
    for cell in ("lstm", "lnlstm", "rnn"):
        ref = by[(cell, "reference")]
        assert ref["status"] == "ok" and ref["fwd_ms"] > 0 and ref["fwdbwd_ms"] > 0
        assert ref["dtype"] == "fp32"
        tri = by[(cell, "triton")]
        if INTERPRET:
            assert tri["status"] == "ok" and tri["fwdbwd_ms"] > 0
            # the tiles that ran, beside the time (B2 H8: 16 rows x 16 units)
            assert any(n.startswith("step tiles") and "fwd 16x16x" in n and ", bwd 16x16x" in n
                       for n in tri["notes"]), tri["notes"]
        else:
            assert tri["status"] == "skipped" and "TRITON_INTERPRET" in tri["notes"][-1]
    assert by[("lstm", "torch.nn")]["status"] == "ok"
    assert by[("rnn", "torch.nn")]["fwd_ms"] > 0
    assert by[("lnlstm", "torch.nn")]["status"] == "n/a"
    assert by[("lstm", "reference")]["peak_mem_bytes"] is None  # CUDA only
    md = (tmp_path / "bench.md").read_text()
    for text in (out, md):
        assert "machine: CPU only, no CUDA GPU" in text and f"torch {torch.__version__}" in text
        assert "| cell | shape (B,T,H) | dtype | method |" in text
        assert "reference loop" in text and "Targets: not evaluated" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped" in err
    else:
        assert (tmp_path / "bench.png").stat().st_size > 1000


def test_lstm_proj_cell_rows_compute_the_same_lstm():
    """The lstm_proj cell (proj_size H // 2): torch.nn's row holds the problem's weights (W_hr
    included), so it, the reference row, the compiled cell's and (under the interpreter) the
    triton row compute the same outputs."""
    def problem():
        return cases.make_problem("lstm_proj", 3, 5, 8, torch.float32, "cpu")

    p = problem()
    assert p.h0.shape == (3, 4) and p.w_hh.shape == (32, 4) and p.w_hr.shape == (4, 8)
    assert any(t is p.w_hr for t in p.leaves())
    with torch.no_grad():
        ref = paths.functional_path("reference")(problem())()
        nn_out = paths.build_nn(problem())[0]()
        outs = {"torch.nn": nn_out}
        if INTERPRET:
            outs["triton"] = paths.functional_path("triton")(problem())()
    assert ref.shape == (5, 3, 4)
    for name, o in outs.items():
        assert torch.allclose(o, ref, atol=1e-5, rtol=1e-5), name


def test_lstm_proj_runs_only_when_named(tmp_path, capsys):
    rc, _, _ = _run(["--baselines", "reference", "--paths", "none", "--modes", "fwd", "--no-plot"],
                    tmp_path, capsys)
    assert rc == 0
    cells = {r["cell"] for r in json.loads((tmp_path / "bench.json").read_text())["results"]}
    assert cells == set(cases.DEFAULT_CELLS) and "lstm_proj" not in cells
    rc, out, _ = _run(["--cells", "lstm_proj", "--baselines", "reference,cudnn", "--paths", "none",
                       "--no-plot"], tmp_path, capsys)
    assert rc == 0 and "LSTM, proj H/2" in out
    recs = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {r["method"] for r in recs} == {"reference", "torch.nn"}
    assert all(r["status"] == "ok" and r["fwdbwd_ms"] > 0 for r in recs)


def test_render_rebuilds_from_json(tmp_path, capsys):
    rc, _, _ = _run(["--cells", "rnn", "--baselines", "reference", "--paths", "none",
                     "--no-plot"], tmp_path, capsys)
    assert rc == 0
    again = tmp_path / "again"
    assert bench.main(["--render", str(tmp_path / "bench.json"), "--out", str(again),
                       "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "machine: CPU only" in out and "tanh RNN" in out
    assert (again / "bench.md").read_text() == (tmp_path / "bench.md").read_text()


def test_registered_path_runs_by_name(tmp_path, capsys):
    cases.register_path("ref-as-path", paths.functional_path("reference"), doc="test only")
    try:
        rc, _, err = _run(["--cells", "lstm", "--paths", "ref-as-path", "--baselines", "none",
                           "--modes", "fwd", "--no-plot"], tmp_path, capsys)
    finally:
        del cases.PATHS["ref-as-path"]
    assert rc == 0 and "lstm B2T3H8 fp32 ref-as-path fwd ..." in err
    (rec,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert rec["kind"] == "fused" and rec["status"] == "ok" and rec["fwdbwd_ms"] is None


def test_fallback_to_reference_is_detected_every_time():
    from fused_rnn import _backend

    def call():
        _backend.warn_once("bench-test", "fused_rnn: cannot take X; using the reference path")

    for _ in range(2):  # warn_once dedups per process: the probe must see it each time
        assert timing._fallback_warnings(call) == [
            "fused_rnn: cannot take X; using the reference path"]
    assert timing._fallback_warnings(lambda: None) == []


def test_sigterm_keeps_what_was_measured(tmp_path, capsys):
    import signal

    calls = {"n": 0}

    def build(p):
        fwd = paths.functional_path("reference")(p)

        def run():
            calls["n"] += 1
            if calls["n"] == 6:  # inside the fwd+bwd measurement, after fwd was timed
                os.kill(os.getpid(), signal.SIGTERM)
            return fwd()

        return run

    before = signal.getsignal(signal.SIGTERM)
    cases.register_path("sigterm-test", build)
    try:
        rc, out, err = _run(["--cells", "lstm,rnn", "--paths", "sigterm-test", "--baselines",
                             "none", "--slow-budget", "1e-9", "--no-plot"], tmp_path, capsys)
    finally:
        del cases.PATHS["sigterm-test"]
    assert rc == 0 and signal.getsignal(signal.SIGTERM) == before
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["interrupted"].startswith("interrupted (signal")
    (rec,) = data["results"]  # the rnn case was never reached
    assert rec["cell"] == "lstm" and rec["status"] == "partial" and rec["fwd_ms"] > 0
    assert "interrupted" in rec["notes"] and "Run cut short" in out


def test_time_limit_skips_and_still_writes(tmp_path, capsys):
    rc, out, err = _run(["--cells", "lstm,rnn", "--paths", "none", "--time-limit", "1e-6",
                         "--no-plot"], tmp_path, capsys)
    assert "machine:" in out
    recs = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert recs and all(r["status"] == "skipped" for r in recs)
    assert any("time limit" in n for n in recs[-1]["notes"])
    # nothing was measured: not a success, and the last line says why
    assert rc == 1
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("fused-rnn bench: nothing was measured: ")
    assert f"{len(recs)} cases skipped" in last and "time limit" in last


def test_every_case_failed_exits_1(tmp_path, monkeypatch, capsys):
    """A sweep in which every measurement failed (here: out of memory) is no success."""
    def oom(fn, grads, s):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(timing, "measure", oom)
    rc, out, err = _run(["--cells", "lstm,rnn", "--paths", "none", "--no-plot"], tmp_path, capsys)
    assert rc == 1
    recs = json.loads((tmp_path / "bench.json").read_text())["results"]  # still written
    assert recs and all(r["status"] in ("error", "n/a") for r in recs)
    n = sum(r["status"] == "error" for r in recs)
    last = err.rstrip().splitlines()[-1]
    assert last.startswith(f"fused-rnn bench: nothing was measured: {n} cases failed (first: ")
    assert "OutOfMemoryError: CUDA out of memory" in last
    assert "Traceback" not in err


def test_quick_plan_bounds_slow_methods():
    s = cases.Settings(device=torch.device("cuda"), quick=True, warmup_ms=10, rep_ms=30,
                       slow_ms=50, slow_budget_s=3, time_limit_s=None, base_dtype="fp16")
    shapes = [(n, cases.SHAPES[n]) for n in ("S1", "S2")]
    plan = cases.make_plan(list(cases.CELLS), shapes, ["bf16"], ["triton"],
                           list(cases.BASELINES), list(cases.MODES), s)
    slow = [c for c in plan if c.kind in ("reference", "compile")]
    assert slow and all(c.shape == "S1" and c.modes == ["fwd"] for c in slow)
    # the reference loop in the sweep's dtype (T3: "in the same dtype"), torch.compile in fp32
    assert {(c.kind, c.dtype) for c in slow} == {("reference", "bf16"), ("compile", "fp32")}
    kinds = [c.kind for c in plan]
    assert kinds.index("reference") > max(i for i, k in enumerate(kinds) if k in ("fused", "nn"))
    assert kinds.index("compile") > max(i for i, k in enumerate(kinds) if k == "reference")
    nn = {(c.cell, c.shape, c.dtype) for c in plan if c.kind == "nn" and not c.na}
    assert ("lstm", "S2", "fp16") in nn and ("lstm", "S2", "bf16") in nn  # fp16: the baseline
    assert all(c.na for c in plan if c.kind == "nn" and c.cell == "lnlstm")
    # The full sweep: the reference loop everywhere, torch.compile at S2 only.
    s.quick = False
    full = cases.make_plan(["lstm"], [(n, cases.SHAPES[n]) for n in cases.SHAPES], ["bf16"],
                           ["triton"], list(cases.BASELINES), list(cases.MODES), s)
    assert {c.shape for c in full if c.kind == "reference"} == set(cases.SHAPES)
    assert [(c.shape, c.modes) for c in full if c.kind == "compile"] == [("S2", ["fwd", "fwd+bwd"])]


# --------------------------------------------------------------------------- targets (synthetic)
def _rec(cell, shape, dtype, kind, method, fwd, fb, mem=None, device="cuda"):
    B, T, H = cases.SHAPES.get(shape, (1, 1, 1))
    return {"cell": cell, "shape": shape, "B": B, "T": T, "H": H, "dtype": dtype, "kind": kind,
            "method": method, "device": device, "status": "ok", "fwd_ms": fwd,
            "fwdbwd_ms": fb, "timer": {}, "peak_mem_bytes": mem, "notes": []}


def _synthetic():
    r = [
        # T1 at S1: exactly 1/3 (pass); fwd+bwd 0.4 (miss). At S3 0.5 (pass, limit 0.55).
        _rec("lstm", "S1", "bf16", "fused", "triton", 3.0, 4.0),
        _rec("lstm", "S1", "bf16", "nn", "cudnn", 9.0, 10.0),
        _rec("lstm", "S1", "fp16", "fused", "triton", 1.0, 2.0),
        _rec("lstm", "S1", "fp16", "nn", "cudnn", 1.5, 1.9),
        _rec("lstm", "S1", "fp16", "reference", "reference", 60.0, 99.0),
        _rec("lstm", "S3", "bf16", "fused", "triton", 5.0, 6.0),
        _rec("lstm", "S3", "bf16", "nn", "cudnn", 10.0, 10.0),
        # T4: LN 1.5x plain in fp16 fwd (pass, at the limit), 2x in fwd+bwd (miss).
        _rec("lnlstm", "S1", "fp16", "fused", "triton", 1.5, 4.0),
        _rec("lnlstm", "S1", "–", "nn", "cudnn", None, None),
        # T5 and T6.
        _rec("rnn", "S2", "fp16", "fused", "triton", 1.0, 3.0),
        _rec("rnn", "S2", "fp16", "nn", "cudnn", 1.2, 2.0),
        _rec("lstm", "S2", "bf16", "fused", "triton", 2.0, 5.0, mem=900 * 2**20),
        _rec("lstm", "S2", "bf16", "nn", "cudnn", 6.0, 20.0, mem=1000 * 2**20),
        _rec("lstm", "S2", "fp16", "fused", "triton", 2.0, 5.0, mem=1100 * 2**20),
        _rec("lstm", "S2", "fp16", "nn", "cudnn", 3.0, 9.0, mem=1000 * 2**20),
        # CPU records never count.
        _rec("lstm", "S4", "bf16", "fused", "triton", 1.0, 1.0, device="cpu"),
        _rec("lstm", "S4", "bf16", "nn", "torch.nn", 9.0, 9.0, device="cpu"),
        # a reference loop in a dtype we did not run is no T3 evidence for another dtype
        _rec("lstm", "S1", "fp32", "reference", "reference", 1e4, 1e4),
    ]
    r[8]["status"] = "n/a"
    return r


def _status(results, tid, shape, mode, dtype=None):
    hits = [t for t in results if t["id"] == tid and t["shape"] == shape and t["mode"] == mode
            and (dtype is None or t["dtype"] == dtype)]
    assert len(hits) == 1, (tid, shape, mode, dtype, hits)
    return hits[0]["passed"]


def test_targets_pass_miss_on_synthetic_numbers():
    res = targets.evaluate_targets(_synthetic())
    assert _status(res, "T1", "S1", "fwd") is True  # 3/9 == 1/3: at the limit passes
    assert _status(res, "T1", "S1", "fwd+bwd") is False  # 0.4 > 1/3
    assert _status(res, "T1", "S3", "fwd") is True and _status(res, "T1", "S3", "fwd+bwd") is False
    # T2 takes our fastest dtype (fp16 here): 1.0/1.5 pass; 2.0/1.9 miss.
    assert _status(res, "T2", "S1", "fwd") is True
    assert _status(res, "T2", "S1", "fwd+bwd") is False
    t2 = next(t for t in res if t["id"] == "T2" and t["shape"] == "S1" and t["mode"] == "fwd")
    assert t2["dtype"] == "fp16" and t2["value"] == pytest.approx(1 / 1.5)
    # T3, fp16 against the reference in fp16: 60/1 = 60x (pass); 99/2 = 49.5x (miss).
    assert _status(res, "T3", "S1", "fwd") is True and _status(res, "T3", "S1", "fwd+bwd") is False
    assert {t["dtype"] for t in res if t["id"] == "T3"} == {"fp16"}
    assert _status(res, "T4", "S1", "fwd", "fp16") is True
    assert _status(res, "T4", "S1", "fwd+bwd", "fp16") is False
    assert _status(res, "T5", "S2", "fwd") is True and _status(res, "T5", "S2", "fwd+bwd") is False
    assert _status(res, "T6", "S2", "fwd+bwd", "bf16") is True
    assert _status(res, "T6", "S2", "fwd+bwd", "fp16") is False
    assert _status(res, "T1", "S2", "fwd") is True and _status(res, "T1", "S2", "fwd+bwd") is True
    # No target at S4 (CPU records only), no T3 at S2 or S3 (no reference there).
    assert not [t for t in res if t["shape"] == "S4"]
    assert not [t for t in res if t["id"] == "T3" and t["shape"] != "S1"]
    # A fused row that fell back to the reference path is no evidence for any target.
    fell = _synthetic()
    for r in fell:
        if r["kind"] == "fused":
            r["fallback"] = True
    assert targets.evaluate_targets(fell) == []


def test_targets_need_their_baseline():
    recs = [_rec("lstm", "S1", "bf16", "fused", "triton", 1.0, 1.0)]
    assert targets.evaluate_targets(recs) == []
    failed = _rec("lstm", "S1", "bf16", "nn", "cudnn", None, None)
    failed["status"] = "error"
    assert targets.evaluate_targets(recs + [failed]) == []


def test_gpu_table_renders_targets_and_machine_line(tmp_path):
    recs = _synthetic()[:-2]
    data = {
        "machine": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
                    "triton": "3.6.0", "cuda": "13.0", "cudnn": "9.19.0", "fused_rnn": "0.1.0",
                    "date": "2026-11-27 00:00 UTC", "tf32_cudnn": True},
        "config": {"mode": "GPU quick", "base_dtype": "fp16", "warmup_ms": 10, "rep_ms": 30,
                   "slow_ms": 50.0},
        "results": recs,
        "targets": targets.evaluate_targets(recs),
    }
    md = report.render_markdown(data)
    assert ("machine: NVIDIA H100 80GB HBM3 | CUDA 13.0 | cuDNN 9.19.0 | torch 2.11.0 | "
            "triton 3.6.0") in md
    assert "× cuDNN fp16 (fwd / f+b)" in md and "T1 ✗" in md and "T2 ✗" in md
    assert "PASS S1 fwd" in md and "MISS S1 fwd+bwd" in md
    # lstm S1 fp16 triton: cuDNN fp16 1.5 / 1.0 and 1.9 / 2.0; the reference 60 / 1, 99 / 2.
    row = next(l for l in md.splitlines() if l.startswith("| LSTM | S1 (16,1024,256) | fp16 | fused"))
    assert "1.50× / 0.95×" in row and "60.0× / 49.5×" in row and "T2 ✗" in row
    why = report.save_plot(data, str(tmp_path / "p.png"))
    assert why is None or "matplotlib not importable" in why


def test_cudnn_version_format(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91900)
    assert report._cudnn_version() == "9.19.0"
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 8902)
    assert report._cudnn_version() == "8.9.2"


# ----------------------------------------------------------------------------------- arguments
BAD_ARGUMENTS = {  # id: the arguments
    "cell":           ["--cells", "mlp"],
    "dtype":          ["--dtypes", "fp8"],
    "named-shape":    ["--shapes", "S9"],
    "shape-2-dims":   ["--shape", "1,2"],
    "shape-zero":     ["--shape", "0,2,3"],
    "shape-text":     ["--shape", "a,b,c"],
    "path":           ["--paths", "nope"],
    "baseline":       ["--baselines", "cudnn,magic"],
    "mode":           ["--modes", "bwd"],
    "device":         ["--device", "tpu"],
    "time-limit":     ["--time-limit", "0"],
    "rep":            ["--rep", "0"],
    "render-missing": ["--render", "/nonexistent/bench.json"],
    "nothing-to-run": ["--paths", "none", "--baselines", "none"],
    "unknown-flag":   ["--bogus"],
}


@pytest.mark.parametrize("args", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS))
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    pytest.param(["--time-limit", "nan"], "argument --time-limit: must be a finite number > 0",
                 id="time-limit-nan"),
    pytest.param(["--time-limit", "-1"], "argument --time-limit", id="time-limit-negative"),
    pytest.param(["--slow-ms", "-5"], "argument --slow-ms: must be a finite number > 0",
                 id="slow-ms-negative"),
    pytest.param(["--slow-ms", "nan"], "argument --slow-ms", id="slow-ms-nan"),
    pytest.param(["--slow-ms", "0"], "argument --slow-ms", id="slow-ms-zero"),
    pytest.param(["--slow-budget", "inf"], "argument --slow-budget", id="slow-budget-inf"),
    pytest.param(["--slow-budget", "nan"], "argument --slow-budget", id="slow-budget-nan"),
    pytest.param(["--warmup", "0"], "argument --warmup: must be at least 1", id="warmup-zero"),
    pytest.param(["--rep", "1.5"], "argument --rep: not an integer", id="rep-float"),
    # "none" empties --paths and --baselines; elsewhere it silently meant the default
    pytest.param(["--cells", "none"], "argument --cells: unknown cell none", id="cells-none"),
    pytest.param(["--dtypes", "none"], "argument --dtypes: unknown dtype none", id="dtypes-none"),
    pytest.param(["--modes", "none"], "argument --modes: unknown mode none", id="modes-none"),
    pytest.param(["--shapes", "none"], "argument --shapes: unknown shape none", id="shapes-none"),
    pytest.param(["--cells", ","], "argument --cells: empty cell list", id="cells-empty"),
])
def test_bad_numbers_and_lists_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # (the --out: a regression that runs writes in tmp)
        bench.main(TINY + args + ["--out", str(tmp_path), "--no-plot"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err


def test_out_naming_a_file_is_a_usage_error(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit) as e:
            bench.main(TINY + ["--out", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "usage:" in err and "argument --out:" in err and "not a folder" in err
        assert "Traceback" not in err
    assert f.read_text() == "not a folder"


@pytest.mark.parametrize("text, why", [
    pytest.param("{bad", "JSONDecodeError", id="not-json"),
    pytest.param("[]", "TypeError", id="a-list"),
    pytest.param('{"results": []}', "KeyError: 'config'", id="no-config"),
    pytest.param(b"\xff\xfe{", "UnicodeDecodeError", id="binary"),
])
def test_render_bad_json_is_a_usage_error(text, why, tmp_path, capsys):
    f = tmp_path / "bench.json"
    if isinstance(text, bytes):
        f.write_bytes(text)
    else:
        f.write_text(text)
    with pytest.raises(SystemExit) as e:
        bench.main(["--render", str(f), "--no-plot"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --render {f}: not a readable bench.json ({why}" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["bench.json"]  # nothing half-written beside it


def test_runner_script_exit_code():
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "run.py"), "--cells", "mlp"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown cell mlp" in p.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses():
    script = os.path.join(REPO, "bench", "gpu_check.sh")
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", script]).returncode == 0


@pytest.mark.skipif(not INTERPRET or torch.cuda.is_available(), reason="the CPU check of the script: TRITON_INTERPRET=1")
@pytest.mark.parametrize("ll", [False, True], ids=["barrier", "ll"])
def test_persistent_smoke_script_runs_on_the_interpreter(ll):
    """bench/persistent_smoke.py (gpu_check.sh's first GPU stage) works as a script: tiny problem,
    one program, persistent against step for each cell it has persistent kernels for; with --ll,
    the plain LSTM and the RNN on the LL exchange."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "persistent_smoke.py")] + ["--ll"] * ll,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"persistent_smoke{' --ll' if ll else ''}: all ok" in p.stdout
    assert p.stdout.count(": ok worst rel err") >= 4  # lstm and rnn, bf16 and fp32
    plans = [line for line in p.stdout.splitlines() if ": plans fwd" in line]
    assert plans and all(line.count("ll=True") == (2 if ll else 0) for line in plans), plans


def test_persistent_smoke_script_without_a_device():
    if INTERPRET or torch.cuda.is_available():
        pytest.skip("only where the script has no device to run on")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "persistent_smoke.py")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 3 and "no CUDA GPU" in p.stdout


@pytest.mark.skipif(not INTERPRET or torch.cuda.is_available(), reason="the CPU check of the script: TRITON_INTERPRET=1")
def test_persistent_tune_script_runs_on_the_interpreter(tmp_path):
    """bench/persistent_tune.py (the GPU session's block-size sweep) works as a script: on the CPU
    the interpreter's one plan per cell and direction, timed, with its table and JSON."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "persistent_tune.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    saved = json.loads((tmp_path / "tune.json").read_text())
    rows = saved["rows"]
    assert saved["partial"] is False  # the final write (each row rewrites it as partial first)
    assert {(r["cell"], r["direction"]) for r in rows} == {(c, d) for c in ("lstm", "rnn", "lnlstm")
                                                          for d in ("fwd", "bwd")}
    assert all(r.get("ok") and r["rel_err_vs_default"] == 0 and r["ms"] > 0 for r in rows), rows
    md = (tmp_path / "tune.md").read_text()
    assert md.count("default") >= 6 and "Best per cell" in md


def test_persistent_tune_order_variants_and_best():
    """The tuner's pieces that only a GPU run exercises end to end: the order of need, the
    variants per cell on CUDA (default first), and the best-variant lines."""
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("persistent_tune", os.path.join(REPO, "bench", "persistent_tune.py"))
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    order = tune._order(["rnn", "lstm", "lnlstm"], ["S3", "S1", "S2"])
    assert order[:5] == [("lstm", "S1"), ("rnn", "S1"), ("lstm", "S2"), ("lnlstm", "S1"), ("lstm", "S3")]
    assert sorted(order) == sorted((c, s) for c in ("rnn", "lstm", "lnlstm") for s in ("S3", "S1", "S2"))
    names = [v[0] for v in tune.variants("lstm", "fwd", True)]
    assert names[:5] == ["default", tune.LL_VARIANT, tune.SOLO_VARIANT, tune.STREAMED_VARIANT, tune.LATE_VARIANT]
    assert len(names) == 11
    assert "BLOCK_H=64 warps=8" in names
    assert tune.LL_VARIANT not in [v[0] for v in tune.variants("lstm", "fwd", True, ll=False)]
    assert [v[0] for v in tune.variants("lnlstm", "fwd", True)][1:] == [tune.LL_VARIANT, "MERGE_C=True (2 barriers)",
                                                                       "MERGE_C=False (3 barriers)"]
    assert [v[0] for v in tune.variants("lnlstm", "bwd", True)] == ["default", tune.LL_VARIANT,
                                                                    "MERGE_BWD=True (2 barriers)"]
    assert tune.LL_VARIANT not in [v[0] for v in tune.variants("lnlstm", "bwd", True, ll=False)]
    from dataclasses import replace

    from fused_rnn.kernels import config, tiles

    name, apply, undo = tune.variants("lnlstm", "bwd", True)[1]
    apply()
    assert tiles.plan_ln("bwd", 16, 256, torch.bfloat16, torch.device("cuda", 0), limit=132)[0].ll
    undo()
    assert not tiles.plan_ln("bwd", 16, 256, torch.bfloat16, torch.device("cuda", 0), limit=132)[0].ll
    base = config.options()
    for name, apply, undo in tune.variants("rnn", "bwd", True)[1:]:
        apply()
        if name in (tune.LL_VARIANT, tune.SOLO_VARIANT):
            key = "ll" if name == tune.LL_VARIANT else "solo"
            assert config.options() == replace(base, **{"ll_sync" if key == "ll" else "solo": True})
            pl, _ = tiles.plan("rnn", "bwd", 16, 256, torch.bfloat16, torch.device("cuda", 0), limit=132)
            assert getattr(pl, key) and (pl.programs == 1) == (key == "solo")
        elif name == tune.LATE_VARIANT:
            assert config.options() == replace(base, early_arrive=False)
            pl, _ = tiles.plan("rnn", "bwd", 16, 256, torch.bfloat16, torch.device("cuda", 0), limit=132)
            assert not pl.early and pl.resident
        elif name == tune.STREAMED_VARIANT:
            assert config.options() == replace(base, w_chunked=False)
            pl, _ = tiles.plan("rnn", "bwd", 16, 768, torch.bfloat16, torch.device("cuda", 0), limit=132)
            assert not pl.resident and tiles.plan("rnn", "bwd", 16, 768, torch.bfloat16, torch.device("cuda", 0),
                                              limit=132, variants=False)[0] == pl
        else:
            o = config.options()
            assert o == replace(base, plan_block_h=o.plan_block_h, plan_num_warps=o.plan_num_warps)
            assert name == f"BLOCK_H={o.plan_block_h} warps={o.plan_num_warps}"
        undo()
        assert config.options() == base
    rows = [dict(cell="lstm", shape="S1", direction="fwd", variant="default", ok=True, ms=2.0, plan="p0"),
            dict(cell="lstm", shape="S1", direction="fwd", variant="v1", ok=True, ms=1.5, plan="p1"),
            dict(cell="lstm", shape="S1", direction="fwd", variant="v2", ok=False, ms=1.0, plan="p2"),
            dict(cell="lstm", shape="S1", direction="bwd", variant="v1", ok=True, ms=1.0, plan="p1")]
    best = tune._best(rows)
    assert best[0].startswith("- lstm S1 fwd: v1 1.500 ms (0.75x") and "no timed default" in best[1]


def _tune_on_a_fake_gpu(monkeypatch):
    """bench/persistent_tune.py as a module, with CUDA "available", the interpreter off and the
    inputs stubbed (the tests then stub the runs and the times)."""
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("persistent_tune", os.path.join(REPO, "bench", "persistent_tune.py"))
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    from fused_rnn import _backend

    monkeypatch.setattr(tune.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune.torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(_backend, "interpreter_on", lambda: False)
    monkeypatch.setattr(tune, "make_inputs", lambda cell, B, T, H, dtype, dev: {
        "x": torch.zeros(T, B, H), "w_hh": torch.zeros(H, H)})
    return tune


def test_persistent_tune_two_passes_under_a_budget(tmp_path, monkeypatch):
    """The tuner's schedule with the GPU faked (plans, runs and times stubbed): pass 0 (the default
    and the structural variants) covers every case in the order of need before pass 1 (the
    BLOCK_H x warps grid) starts; a variant whose plan is the default's is not timed; a budget
    that runs out stops new variants and lists them as not run."""
    tune = _tune_on_a_fake_gpu(monkeypatch)
    from dataclasses import replace

    from fused_rnn.kernels import config

    # the plan a variant gets: the options as text; the LL variant gives the default's plan
    monkeypatch.setattr(tune, "plan_of", lambda cell, direction, B, H, dtype, dev: (
        str(replace(config.options(), ll_sync=False)), ""))
    monkeypatch.setattr(tune, "runners", lambda cell, d: ((lambda: (torch.ones(2), None)),) * 2 + (None,))
    clock = [0.0]

    def time_ms(fn, cuda):
        clock[0] += 1.0  # each timed variant takes 1 s of the budget
        return 1.0

    monkeypatch.setattr(tune, "time_ms", time_ms)
    monkeypatch.setattr(tune.time, "time", lambda: clock[0])
    rc = tune.main(["--out", str(tmp_path), "--shapes", "S1,S4", "--cells", "lstm,rnn", "--budget-s", "1000"])
    assert rc == 0
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    grid = [i for i, r in enumerate(rows) if r["variant"].startswith("BLOCK_H=")]
    structural = [i for i, r in enumerate(rows) if not r["variant"].startswith("BLOCK_H=")]
    assert grid and structural and max(structural) < min(grid)
    assert [(r["cell"], r["shape"]) for r in rows if r["variant"] == "default"][::2] == [
        ("lstm", "S1"), ("rnn", "S1"), ("lstm", "S4"), ("rnn", "S4")]
    ll = [r for r in rows if r["variant"] == tune.LL_VARIANT]
    assert ll and all(r["skip"] == "the default's plan (timed above)" for r in ll)
    n_timed = sum("ms" in r for r in rows)
    assert n_timed == clock[0] and n_timed == len(rows) - len(ll)
    # a budget for 10 variants: pass 0 of the first cases only, the rest listed as not run
    clock[0] = 0.0
    rc = tune.main(["--out", str(tmp_path), "--shapes", "S1,S4", "--cells", "lstm,rnn", "--budget-s", "9.5"])
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert rc == 0 and sum("ms" in r for r in saved["rows"]) == 10
    assert not any(r["variant"].startswith("BLOCK_H=") for r in saved["rows"])
    assert any("past the budget" in s for s in saved["skipped"])


@pytest.mark.skipif(not INTERPRET or torch.cuda.is_available(), reason="the CPU check of the script: TRITON_INTERPRET=1")
def test_persistent_tune_step_mode_runs_on_the_interpreter(tmp_path):
    """bench/persistent_tune.py --step (the step path's tiles): on the CPU the default tile of
    each cell and direction, run and timed, its tile in the plan column."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "persistent_tune.py"), "--step", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    assert {(r["cell"], r["direction"]) for r in rows} == {(c, d) for c in ("lstm", "rnn") for d in ("fwd", "bwd")}
    assert all(r.get("ok") and r["plan"].startswith("tile 16x16x") and r["ms"] > 0 for r in rows), rows
    assert "step-path tiles" in (tmp_path / "tune.md").read_text()


def test_persistent_tune_step_mode_schedule(tmp_path, monkeypatch):
    """--step with the GPU faked (runs and times stubbed, the tiles real): S3 first, then S2; the
    variants set options().step_tiles (or ask for the unfused kernels) and clear it; a variant
    whose tile is the default's (S3's 64 rows, S2's 16) is not timed."""
    tune = _tune_on_a_fake_gpu(monkeypatch)
    from fused_rnn.kernels import config, tiles

    monkeypatch.setattr(tiles, "sm_count", lambda dev: 132)
    seen = []

    def runners(cell, d, cuda):
        seen.append(dict(config.options().step_tiles,
                         **({"unfused": True} if tune.STEP_OPTS["fused"] is False else {})))
        return ((lambda: (torch.ones(2), None)),) * 2 + (None,)

    monkeypatch.setattr(tune, "step_runners", runners)
    monkeypatch.setattr(tune, "time_ms", lambda fn, cuda: 1.0)
    rc = tune.main(["--step", "--out", str(tmp_path), "--shapes", "S2,S3", "--cells", "lstm,rnn"])
    assert rc == 0 and config.options().step_tiles == ()
    rows = json.loads((tmp_path / "tune.json").read_text())["rows"]
    assert [(r["cell"], r["shape"]) for r in rows if r["variant"] == "default"][::2] == [
        ("lstm", "S3"), ("rnn", "S3"), ("lstm", "S2"), ("rnn", "S2")]
    by = {(r["cell"], r["shape"], r["direction"], r["variant"]): r for r in rows}
    assert by[("lstm", "S3", "fwd", "default")]["plan"] == "tile 64x32x32 w8"
    assert by[("lstm", "S3", "fwd", "tile 64x32 warps=8")]["skip"] == "the default's plan (timed above)"
    assert by[("lstm", "S3", "fwd", "tile 16x32 warps=4")]["plan"] == "tile 16x32x32 w4"
    assert by[("lstm", "S2", "fwd", "default")]["plan"] == "tile 64x16x32 w8"
    assert by[("lstm", "S2", "bwd", "tile 16x32 warps=4")]["skip"] == "the default's plan (timed above)"
    assert by[("lstm", "S2", "bwd", "BLOCK_K=32")]["plan"] == "tile 16x32x32 w4"
    assert {"BLOCK_B": 16, "BLOCK_H": 16, "num_warps": 4} in seen and {"BLOCK_H": 64, "num_warps": 8} in seen
    assert {"unfused": True} in seen and tune.STEP_OPTS == {"fused": None}
    assert by[("lstm", "S3", "bwd", tune.UNFUSED_VARIANT)]["plan"] == "unfused, pointwise tile 16x32x16 w4"
    assert len(seen) == sum("ms" in r for r in rows)


def test_persistent_tune_script_without_a_device():
    if INTERPRET or torch.cuda.is_available():
        pytest.skip("only where the script has no device to run on")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "persistent_tune.py"), "--out", "/nonexistent/x"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 3 and "no CUDA GPU" in p.stderr


def test_fastest_path_lines():
    """The per-case fastest-path lines: the ratio to the runner-up, only where two paths ran."""
    times = {("lstm", "persistent"): (2.0, 6.0), ("lstm", "graph"): (5.0, 12.0),
             ("lstm", "triton"): (20.0, 40.0), ("rnn", "triton"): (1.0, 2.0)}
    recs = [_rec(cell, "S1", "bf16", "fused", path, *t) for (cell, path), t in times.items()]
    text = report.render_fastest_paths({"results": recs})
    assert "- LSTM S1 bf16 fwd: persistent 2 ms, 2.50× faster than graph (5 ms)" in text
    assert "- LSTM S1 bf16 fwd+bwd: persistent 6 ms, 2.00× faster than graph (12 ms)" in text
    assert "tanh RNN" not in text  # one path only
    assert report.render_fastest_paths({"results": recs[3:]}) == ""
