"""The `fused-rnn` command: help, argument errors, `check` (tiny sweeps), `demo` (a few steps).

The sweeps and the demo run in subprocesses, as a user runs them: `check` must see
TRITON_INTERPRET before triton is imported, and its re-exec replaces the process.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_working_interpreter
from fused_rnn import check, cli


def run_cli(*args, interpret=True, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "fused_rnn", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


def exit_code(argv, capsys):
    """Run cli.main in-process; (exit status, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ------------------------------------------------------------------------------------------
# help and argument errors


@pytest.mark.parametrize("argv, expect", [
    pytest.param(["--help"], ["check", "bench", "demo"], id="top"),
    pytest.param(["check", "--help"],
                 ["--quick", "--cells", "--dtypes", "--seed", "TRITON_INTERPRET"], id="check"),
    pytest.param(["demo", "--help"], ["--quick", "--steps", "--device", "--out"], id="demo"),
])
def test_help(argv, expect, capsys):
    rc, out, _ = exit_code(argv, capsys)
    assert rc == 0
    assert out.startswith("usage: fused-rnn")
    for word in expect:
        assert word in out
    assert "_inject" not in out  # the fault-injection flag is internal


@pytest.mark.skipif(importlib.util.find_spec("fused_rnn.bench") is None,
                    reason="fused_rnn.bench is not written yet")
def test_bench_help(capsys):
    rc, out, err = exit_code(["bench", "--help"], capsys)
    assert rc == 0
    assert "usage" in (out + err).lower()


def test_module_entry_point():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("fused_rnn ")


@pytest.mark.parametrize("argv, message", [
    pytest.param([], "required", id="no-command"),
    pytest.param(["frobnicate"], "invalid choice", id="unknown-command"),
    pytest.param(["check", "--cells", "lstm,mlp"], "unknown cell 'mlp'", id="check-bad-cell"),
    pytest.param(["check", "--dtypes", "fp8"], "unknown dtype 'fp8'", id="check-bad-dtype"),
    pytest.param(["check", "--seed", "-3"], "--seed", id="check-bad-seed"),
    pytest.param(["check", "--device", "tpu"], "invalid choice", id="check-bad-device"),
    pytest.param(["demo", "--steps", "0"], "at least 1", id="demo-zero-steps"),
    pytest.param(["demo", "--steps", "ten"], "not an integer", id="demo-bad-steps"),
    pytest.param(["demo", "--device", "tpu"], "'tpu' is not auto, cpu, cuda", id="demo-bad-device"),
    pytest.param(["demo", "--seq-len", "100000"], "--seq-len 100000", id="demo-seq-too-long"),
    pytest.param(["demo", "--out", ""], "argument --out: empty path", id="demo-empty-out"),
    # refused up front with an estimate, before any allocation can fail
    pytest.param(["demo", "--hidden-size", "10000000", "--device", "cpu"],
                 "--hidden-size 10000000, --batch-size 64, --seq-len 128: the two models need at "
                 "least", id="demo-hidden-size-cannot-fit"),
    pytest.param(["demo", "--batch-size", "1000000000000", "--device", "cpu"],
                 "--batch-size 1000000000000", id="demo-batch-size-cannot-fit"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    rc, _, err = exit_code(argv, capsys)
    assert rc == 2
    assert "usage: fused-rnn" in err
    assert message in err


def test_demo_too_many_threads_exits_2(tmp_path, capsys):
    tiny = ["--quick", "--steps", "1", "--hidden-size", "4", "--batch-size", "1", "--seq-len", "4",
            "--device", "cpu", "--out", str(tmp_path)]  # a regression runs fast, writes in tmp
    rc, _, err = exit_code(["demo", "--threads", str(10 * (os.cpu_count() or 1))] + tiny, capsys)
    assert rc == 2
    assert "usage: fused-rnn" in err and "argument --threads: at most" in err


def test_demo_out_naming_a_file_is_a_usage_error(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    for out in (f, f / "sub"):
        rc, _, err = exit_code(["demo", "--out", str(out)], capsys)
        assert rc == 2
        assert "usage: fused-rnn" in err and "argument --out:" in err and "not a folder" in err


@pytest.mark.parametrize("error", [
    pytest.param(lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
                 id="torch-oom"),
    pytest.param(lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. "
                                      "DefaultCPUAllocator: can't allocate memory: you tried to "
                                      "allocate 64000000000000 bytes.\nmore"), id="cpu-allocator"),
    pytest.param(lambda: MemoryError(), id="memory-error"),
])
def test_demo_out_of_memory_is_one_line(error, tmp_path, monkeypatch, capsys):
    """Sizes that pass the up-front estimate and still cannot be allocated: one line, exit 1."""
    from fused_rnn import demo

    def train(*args, **kwargs):
        raise error()

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # demo.main sets 1 on the CPU
    rc, _, err = exit_code(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path)], capsys)
    assert rc == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fused-rnn demo: out of memory on cpu (")
    assert "try a smaller --hidden-size, --batch-size or --seq-len" in err


def test_demo_other_runtime_errors_are_not_called_out_of_memory(tmp_path, monkeypatch, capsys):
    from fused_rnn import demo

    def train(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path)])


def test_check_where_every_case_is_skipped_exits_1(monkeypatch, capsys):
    """A sweep the kernels took no case of (each ran the reference path) checked nothing."""
    monkeypatch.setattr(check, "triton_path", check.reference_path)
    rc = check.main(["rnn_tanh"], ["fp64"], True, 0, torch.device("cpu"))
    out, err = capsys.readouterr()
    n = len(check.QUICK_SHAPES)
    assert f"check: {n} cases, 0 ok, {n} SKIP, 0 FAIL" in out
    assert rc == 1
    assert err == (f"fused-rnn check: nothing was checked: the kernels took none of the {n} cases "
                   "(every one SKIP)\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine has the CUDA lane")
def test_check_cuda_only_dtype_on_cpu_exits_2():
    r = run_cli("check", "--quick", "--dtypes", "bf16", "--device", "cpu")
    assert r.returncode == 2
    assert "bf16 and fp16 run only on CUDA" in r.stderr


def test_check_in_process_never_reexecs(monkeypatch, capsys):
    """cli.main with an explicit argv (a library caller, this test) must not replace the process."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc, out, err = exit_code(["check", "--quick", "--device", "cpu"], capsys)
    assert rc == 2
    assert "TRITON_INTERPRET=1 fused-rnn check" in err
    assert out == ""


# ------------------------------------------------------------------------------------------
# check


def _table_rows(stdout):
    return [line for line in stdout.splitlines() if line.split(" ", 1)[0] in check.CELLS]


@requires_working_interpreter
def test_check_quick_passes_and_prints_table():
    r = run_cli("check", "--quick", "--dtypes", "fp32", "--device", "cpu", "--seed", "7")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "seed: 7" in out
    assert "through the Triton interpreter (TRITON_INTERPRET=1)" in out
    assert "bf16 and fp16 are CUDA lanes" in out
    assert "poison: buffers the kernels fill start as NaN" in out
    header = [line for line in out.splitlines() if line.startswith("cell ")]
    assert header
    assert all(c in header[0] for c in ("out", "h_n", "c_n", "dx", "dW", "dLN", "thresh"))
    rows = _table_rows(out)
    n = len(check.CELLS) * len(check.QUICK_SHAPES)
    assert len(rows) == n, out
    assert all(row.rstrip().endswith("ok") and "1e-05" in row for row in rows)
    assert f"check: {n} cases, {n} ok, 0 SKIP, 0 FAIL" in out


@requires_working_interpreter
def test_check_paths_persistent_and_graph():
    """--paths: one table per time-loop path; on the CPU the persistent kernels run (one program)
    and the graph path (CUDA only) is reported as SKIP with the path that ran instead."""
    r = run_cli("check", "--quick", "--cells", "lnlstm,rnn_tanh", "--dtypes", "fp64", "--device", "cpu",
                "--seed", "3", "--paths", "persistent,graph")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "path: persistent" in out and "path: graph" in out
    pers = out.split("path: persistent", 1)[1].split("path: graph", 1)[0]
    graph = out.split("path: graph", 1)[1]
    n = 2 * len(check.QUICK_SHAPES)
    assert len(_table_rows(pers)) == n and all(row.rstrip().endswith("ok") for row in _table_rows(pers))
    rows = _table_rows(graph)
    if not torch.cuda.is_available():
        assert rows and all("SKIP  the graph path did not take it (ran" in row for row in rows)
    assert f"check: {2 * n} cases" in out and "0 FAIL" in out
    assert "graph:lnlstm-fp64" in out  # skipped cases are named with their path


@requires_working_interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="re-exec happens only without a GPU")
def test_check_reexecs_under_interpreter_without_gpu():
    r = run_cli("check", "--quick", "--cells", "rnn_tanh", "--dtypes", "fp64", interpret=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "re-running under the Triton interpreter" in r.stderr
    assert "TRITON_INTERPRET=1" in r.stdout
    assert "0 FAIL" in r.stdout


@requires_working_interpreter
def test_check_injected_error_fails():
    r = run_cli("check", "--quick", "--cells", "rnn_tanh", "--dtypes", "fp32", "--_inject-error")
    assert r.returncode == 1, r.stdout + r.stderr
    rows = _table_rows(r.stdout)
    assert len(rows) == len(check.QUICK_SHAPES)
    assert all("FAIL  out" in row for row in rows)
    assert "0 ok" in r.stdout


def test_check_poison_catches_unwritten_output():
    """A kernel that never writes the last time step of ``out`` fails on the NaN poison."""

    def lazy_kernel(cell, p, lengths):
        outs = check.reference_path(cell, p, lengths)
        o = outs["out"]
        fresh = torch.empty_like(o)  # as a launcher allocates its output
        fresh[:-1] = o[:-1]
        return dict(outs, out=fresh)

    case = check.Case("lstm", "fp32", check.Shape(4, 3, 5, 7))
    res = check.run_case(case, 0, torch.device("cpu"), 1e-5, kernel=lazy_kernel)
    assert not res.ok
    assert res.errors["out"] != res.errors["out"]  # NaN
    assert res.errors["h_n"] <= 1e-5  # the rest was written
    good = check.run_case(case, 0, torch.device("cpu"), 1e-5, kernel=check.reference_path)
    assert good.ok, good


def test_check_reference_fallback_is_a_skip_not_a_pass():
    """A case the kernels hand to the reference path must not count as checked."""

    def falls_back(cell, p, lengths):
        return check.reference_path(cell, p, lengths)

    case = check.Case("rnn_tanh", "fp32", check.Shape(2, 2, 3, 5))
    res = check.run_case(case, 0, torch.device("cpu"), 1e-5, kernel=falls_back, expect_triton=True)
    assert res.skipped and not res.passed and res.ok
    assert "SKIP  the kernels did not take it" in check.table_row(res)


def test_check_exception_is_a_failed_row():
    def broken(cell, p, lengths):
        raise RuntimeError("launch failed")

    case = check.Case("rnn_relu", "fp64", check.Shape(2, 2, 3, 5))
    res = check.run_case(case, 0, torch.device("cpu"), 1e-10, kernel=broken)
    assert not res.ok
    assert "RuntimeError: launch failed" in res.error
    assert "FAIL  RuntimeError: launch failed" in check.table_row(res)


# ------------------------------------------------------------------------------------------
# demo


def test_demo_quick_few_steps(tmp_path):
    out_dir = tmp_path / "demo"
    r = run_cli("demo", "--quick", "--steps", "3", "--hidden-size", "32", "--batch-size", "4",
                "--seq-len", "16", "--device", "cpu", "--out", str(out_dir), interpret=False)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "fused_rnn.LSTM backend=auto -> ATen (CPU route)" in out  # what auto runs on the CPU
    assert "torch.nn.LSTM on cpu" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("fused_rnn.LSTM ", "torch.nn.LSTM ", "fused_rnn.LSTM+LN "))}
    assert "whole-sequence (CPU route) on cpu" in " ".join(rows["fused_rnn.LSTM+LN"])  # the layer-norm row
    assert "layer norm: fused_rnn.LSTM+LN takes" in out
    for name in ("fused_rnn.LSTM", "torch.nn.LSTM", "fused_rnn.LSTM+LN"):
        assert float(rows[name][-1].replace(",", "")) > 0  # tokens/s
    assert "3/3" in r.stderr  # the progress bar
    png = out_dir / "loss.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # the plot is optional; the demo must say why there is none
        assert not png.exists() and "matplotlib is not importable" in r.stdout + r.stderr
    res = json.loads((out_dir / "results.json").read_text())
    for name in ("fused_rnn.LSTM", "torch.nn.LSTM", "fused_rnn.LSTM+LN"):
        assert len(res["runs"][name]["losses"]) == 3
        assert res["runs"][name]["tokens_per_s"] > 0
    # Same initial weights and batch: the first step's losses agree.
    f, t = res["runs"]["fused_rnn.LSTM"]["losses"][0], res["runs"]["torch.nn.LSTM"]["losses"][0]
    assert abs(f - t) < 1e-4


def test_demo_writes_outside_the_checkout_by_default():
    """The demo's default output folder is under the system's temp folder, never the checkout (it
    was ./fused-rnn-demo, inside whatever folder the command ran in)."""
    import tempfile

    from fused_rnn import cli

    out = cli.build_parser().parse_args(["demo"]).out
    assert os.path.commonpath([os.path.abspath(out), tempfile.gettempdir()]) == tempfile.gettempdir()
