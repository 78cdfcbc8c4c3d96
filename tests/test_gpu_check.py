"""bench/gpu_check.sh and what it runs first, checked on the CPU: its plan (the budget, the
order), the smoke stages' rc handling, the memcheck order, and bench/precompile.py's jobs (taken
from the stages' own tables) and launches (the same specialisations as a real launch)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import INTERPRET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
on_interpreter = pytest.mark.skipif(not INTERPRET or torch.cuda.is_available(),
                                    reason="the CPU check of the script: TRITON_INTERPRET=1")


def _env(**kw):
    """The environment without the script's knobs (a developer's T_* must not change the plan)."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("T_") or k in ("TOTAL_S", "SKIP_STAGES", "BENCH_ARGS", "OUT"))}
    env.update(kw)
    return env


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _plan(tmp_path, **env):
    out = tmp_path / "out"
    p = subprocess.run(["bash", SCRIPT, "--plan"], capture_output=True, text=True, timeout=60,
                       env=_env(OUT=str(out), **env))
    assert p.returncode == 0, p.stdout + p.stderr
    assert not out.exists()  # ran nothing, wrote nothing
    stages = [(m[1], int(m[2])) for m in re.finditer(r"^\s*\d+\. (\S+)\s+(\d+) s", p.stdout, re.M)]
    total = int(re.search(r"^sum: (\d+) s of TOTAL_S (\d+)", p.stdout, re.M)[1])
    return stages, total, p.stdout


@needs_bash
def test_plan_fits_the_budget_precompile_first(tmp_path):
    stages, total, text = _plan(tmp_path)
    names = [n for n, _ in stages]
    assert names[:3] == ["setup", "install", "precompile"]
    # ordered by the value of the answer
    order = ["smoke", "smoke_ll", "bench", "policy", "ptests", "memcheck", "pytest", "demo", "check", "tune"]
    assert names[3:] == order
    assert total == sum(lim for _, lim in stages) <= 540
    assert all(lim > 0 for n, lim in stages if n != "tune")
    # precompile compiles for exactly what the bench stage runs
    pre = re.search(r'^precompile command: .*--bench "(.*)"$', text, re.M)[1]
    assert re.search(r"^bench command: fused-rnn bench (.*)$", text, re.M)[1] == pre
    # tune gets only what the others leave, and a skipped stage costs nothing
    stages, total, _ = _plan(tmp_path, TOTAL_S="900", SKIP_STAGES="memcheck")
    assert dict(stages)["memcheck"] == 0 and dict(stages)["tune"] == 200 and total <= 900


@needs_bash
@pytest.mark.parametrize("rc,want", [("0", "keep"), ("1", "keep"), ("2", "keep"), ("-1", "keep"),
                                     ("124", "drop"), ("137", "drop")])
def test_only_a_smoke_hang_drops_the_path(rc, want):
    p = subprocess.run(["bash", SCRIPT, "--decide-smoke", rc], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout.strip() == want
    # the smoke stages use the decision, not their own test of the rc
    text = open(SCRIPT).read()
    assert text.count('=$(smoke_verdict "$RC" ') == 2
    verdict = re.search(r"^smoke_verdict\(\) \{\n(.*?)^\}", text, re.M | re.S)[1]
    assert 'if [ "$(decide_smoke "$1")" = drop ]; then' in verdict


@needs_bash
def test_script_with_every_stage_skipped_writes_few_files(tmp_path):
    """The run's skeleton on the CPU: one summary line a stage, at most 8 files (the device tool's
    limit), exit 3 (no GPU)."""
    stages, _, _ = _plan(tmp_path)
    skip = ",".join(n for n, _ in stages if n != "setup")
    out = tmp_path / "run"
    p = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120,
                       env=_env(OUT=str(out), SKIP_STAGES=skip, PYTHON=sys.executable))
    assert p.returncode == (0 if torch.cuda.is_available() else 3), p.stdout + p.stderr
    summary = (out / "summary.txt").read_text()
    for name, _ in stages:
        assert re.search(rf"^{name} +(ok|skipped) ", summary, re.M), (name, summary)
    assert len(os.listdir(out)) <= 8


def test_memcheck_runs_the_persistent_cases_first():
    mc = _module("memcheck_cases")
    cs = mc.cases()
    ranks = [mc.case_rank(c) for c in cs]
    assert ranks == sorted(ranks) and ranks[0] == 0 and 1 in ranks and 2 in ranks
    assert all(("persistent" in c["name"]) == (mc.case_rank(c) < 2) for c in cs)
    assert len({c["seed"] for c in cs}) == len(cs)  # each case kept its own seed


def test_precompile_jobs_come_from_the_stages_tables(monkeypatch):
    pytest.importorskip("triton")
    pc = _module("precompile")
    from dataclasses import replace

    from fused_rnn.bench.cases import PATHS, Settings, make_plan
    from fused_rnn.bench.command import _selection, build_parser

    dev = torch.device("cpu")
    for name in ("triton", "persistent"):  # both lanes: as if the Triton paths ran here
        monkeypatch.setitem(PATHS, name, replace(PATHS[name], available=lambda d: None))
    todo = pc.jobs(pc.DEFAULT_BENCH, dev)
    assert [j[0] for j in todo] == sorted((j[0] for j in todo), key=["smoke", "bench", "memcheck"].index)
    smoke = pc.persistent_smoke
    assert [j[1:3] for j in todo if j[0] == "smoke"] == [
        (c, str(d).replace("torch.", "")) for ll in (False, True) for c, d, skip in smoke.cases(ll, dev) if not skip]
    args = build_parser().parse_args(pc.DEFAULT_BENCH.split())
    _, shapes, dtypes, _, base = _selection(args, False)
    plan = make_plan(["lstm", "lnlstm", "rnn"], shapes, dtypes, args.paths, [], ["fwd"],
                     Settings(dev, True, 0, 0, 0.0, 0.0, None, base))
    # the graph rows compile as the triton rows (the same step launches)
    want = {(c.cell, c.dtype, {"graph": "triton"}.get(c.method, c.method)) for c in plan if c.kind == "fused"}
    assert {(j[1], j[6], j[7]) for j in todo if j[0] == "bench"} == want
    assert {m for _, _, m in want} == {"triton", "persistent"} and len(want) == 6
    mc = [j[1] for j in todo if j[0] == "memcheck"]
    assert mc == [c["name"] for c in pc.memcheck_cases.cases() if c["dtype"] in ("fp32", "fp64")]
    assert pc.small_T(1024) == 16 and pc.small_T(5) == 5 and pc.small_T(1) == 1 and pc.small_T(40) == 24


@on_interpreter
def test_precompile_launches_what_a_real_launch_does():
    """A compile-only job at the short T launches the same kernels with the same specialisations as
    the launchers running for real at the long T (the interpreter runs them)."""
    pc = _module("precompile")
    dev = torch.device("cpu")
    for job in [("bench", "lstm", "x", 4, 40, 32, "fp32", "triton"),
                ("bench", "rnn", "x", 4, 40, 32, "fp32", "persistent")]:
        try:
            pc.install_hook(compile_only=False)
            pc.LAUNCHES.clear()
            pc._bench(job, dev, T=40)
            real = sorted(pc.LAUNCHES)
            pc.install_hook(compile_only=True)
            j, _, err, short = pc.run_job(job)
        finally:
            from triton.runtime import interpreter, jit

            for cls in (jit.JITFunction, interpreter.InterpretedFunction):
                cls.run = getattr(cls.run, "_precompile", cls.run)
        assert err is None and real and short == real, (job, real, short)


@on_interpreter
def test_precompile_script_runs_on_the_interpreter():
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "precompile.py"), "--workers", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    last = re.search(r"^precompile: (\d+)/(\d+) jobs, (\d+) distinct specialisations launched.*, 0 raised",
                     p.stdout, re.M)
    assert last and last[1] == last[2] and int(last[3]) > 10, p.stdout[-3000:]
