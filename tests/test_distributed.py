"""fused_rnn layers under PyTorch's distributed engine, on the CPU: two gloo processes train
each model of tests/_dist_worker.py under DistributedDataParallel and under FSDP2
(``fully_shard``); their all-reduced gradients and their weights after the steps equal one process
training on the whole batch. A state_dict checkpoint taken in a DDP run restores training exactly.
Lane 1 runs the reference backend; the interpreter lane the Triton kernels (tiny shapes)."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import _dist_worker as W
from conftest import INTERPRET

BACKEND = "triton" if INTERPRET else "reference"
TIMEOUT_S = 300  # two processes importing torch and training a few tiny steps; never hang CI

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both processes' results, from one spawn for the whole module."""
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(W.worker, args=(2, _free_port(), BACKEND, str(out)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two gloo processes did not finish in {TIMEOUT_S} s")
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]


def _close(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", list(W.models("reference")))
def test_two_processes_equal_one(ranks, engine, name):
    grads, weights = W.single_process(name, BACKEND)
    for r, res in enumerate(ranks):
        g, w = res[(engine, name)]
        _close(g, grads, f"rank {r} gradient after step 1")
        _close(w, weights, f"rank {r} weights after {W.STEPS} steps")


def test_checkpoint_restores_training(ranks):
    for r, res in enumerate(ranks):
        c = res[("checkpoint", "lstm_ln")]
        assert torch.equal(c["continued"], c["resumed"]), (r, c)
        assert c["same_weights"], r


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "train_ddp.py")


@pytest.mark.skipif(INTERPRET, reason="the example trains on the CPU route; the interpreter lane tests kernels")
def test_example_trains_and_resumes(tmp_path):
    """examples/train_ddp.py under torchrun, 2 processes: 4 steps with a checkpoint after step 2,
    then 2 steps resumed from it print the first run's losses at steps 3 and 4."""
    def run(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", EXAMPLE,
               "--hidden", "16", "--seq-len", "12", "--batch-size", "4", "--log-every", "1", "--steps", "2",
               "--checkpoint", str(tmp_path / "c{step}.pt"), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        return [line.split("  ")[:2] for line in r.stdout.splitlines() if line.startswith("step")]

    whole = run("--steps", "4", "--save-every", "2")
    resumed = run("--resume", str(tmp_path / "c2.pt"))
    assert len(whole) == 4 and resumed == whole[2:], (whole, resumed)
