"""The measured path policy (fused_rnn/_paths.py, fused_rnn/data/path_policy.json) and its writer
(bench/write_policy.py), on the CPU: CUDA tensors are faked by patching Tensor.is_cuda and the
device name; the table is injected by a fixture."""
import copy
import importlib.util
import json
import os
import warnings

import pytest
import torch

import fused_rnn
from conftest import kernel_device, requires_kernels
from fused_rnn import _paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD = "NVIDIA Fake 100"


def _writer():
    spec = importlib.util.spec_from_file_location("write_policy", os.path.join(REPO, "bench", "write_policy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table(entries, card=CARD):
    return {"format": 1, "devices": {card: {"source": {"run": "test", "date": "2025-01-01"}, "entries": entries}}}


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors that say they are CUDA tensors on CARD, the graph and persistent paths
    possible unless a test says otherwise, and no FUSED_RNN_PATH / use_path in force."""
    monkeypatch.delenv(_paths.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(_paths, "interpreter_on", lambda: False)
    monkeypatch.setattr(_paths, "graph_unavailable", lambda x: (None, False))
    monkeypatch.setattr(_paths, "device_name", lambda device: CARD)


@pytest.fixture
def policy(monkeypatch):
    """policy(entries): make the table {CARD: entries} the one "auto" reads."""
    def use(entries, card=CARD):
        monkeypatch.setattr(_paths, "_policy", _paths.validate_policy(_table(entries, card)))
    return use


def _x(B=16, dtype=torch.float16):
    return torch.zeros(3, B, 8, dtype=dtype)


def _resolve(x, cell, hidden, plan=(object(), "")):
    return _paths.resolve("op", "auto", x, lambda: plan, cell, hidden)


# ------------------------------------------------------------------------------------ the table
def test_shipped_table_parses_and_lists_no_device(monkeypatch):
    monkeypatch.setattr(_paths, "_policy", None)  # load it afresh, through importlib.resources
    table = _paths.policy_table()
    assert table["format"] == _paths.POLICY_FORMAT and table["devices"] == {}
    assert "nothing measured" in table["status"]
    assert _paths.policy_table() is table  # loaded once


def test_shipped_table_leaves_auto_as_before(monkeypatch, fake_cuda):
    """Nothing measured: "auto" is AUTO_PATH for every cell, and no device name is asked for."""
    monkeypatch.setattr(_paths, "_policy", None)

    def no_call(device):
        raise AssertionError("the device name was asked for with an empty table")

    monkeypatch.setattr(_paths, "device_name", no_call)
    assert _paths.AUTO_PATH == "step"
    for cell in _paths.POLICY_CELLS:
        assert _resolve(_x(), cell, 256) == ("step", None)


@pytest.mark.parametrize("bad, what", [
    ({"format": 2, "devices": {}}, "format"),
    ({"format": 1}, "devices"),
    (_table({"mlp": {}}), "unknown cell"),
    (_table({"lstm": {"fp8": {}}}), "unknown dtype"),
    (_table({"lstm": {"fp16": {"B<=8,H<=256": {"path": "step"}}}}), "shape class"),
    (_table({"lstm": {"fp16": {"B<=16,H<=256": {"path": "adaptive"}}}}), "path must be"),
    ({"format": 1, "devices": {CARD: {"entries": {}}}}, "source"),
])
def test_validate_rejects(bad, what):
    with pytest.raises(ValueError, match=what):
        _paths.validate_policy(bad)


def test_shape_class():
    assert _paths.shape_class(16, 256) == "B<=16,H<=256"
    assert _paths.shape_class(17, 257) == "B<=64,H<=1024"
    assert _paths.shape_class(64, 1024) == "B<=64,H<=1024"
    assert _paths.shape_class(65, 1025) == "B>64,H>1024"
    assert len(set(_paths.SHAPE_CLASSES)) == 9


# ----------------------------------------------------------------------------------- the lookup
def test_lookup_hit_and_miss(fake_cuda, policy):
    policy({"lstm": {"fp16": {"B<=16,H<=256": {"path": "persistent"}, "B<=64,H<=1024": {"path": "graph"}}},
            "rnn": {"bf16": {"B>64,H>1024": {"path": "step"}}}})
    plan = object()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve(_x(), "lstm", 256, (plan, "")) == ("persistent", plan)
        assert _resolve(_x(B=64), "lstm", 512) == ("graph", None)
        assert _resolve(_x(B=128, dtype=torch.bfloat16), "rnn", 2048, (plan, "")) == ("step", None)
        # misses: another cell, dtype, shape class, or no key: today's rule
        assert _resolve(_x(), "lnlstm", 256, (plan, "")) == ("step", None)
        assert _resolve(_x(dtype=torch.float32), "lstm", 256, (plan, "")) == ("step", None)
        assert _resolve(_x(B=17), "lstm", 256, (plan, "")) == ("step", None)
        assert _resolve(_x(), None, None, (plan, "")) == ("step", None)


def test_lookup_other_device_misses(fake_cuda, policy):
    policy({"lstm": {"fp16": {"B<=16,H<=256": {"path": "persistent"}}}}, card="NVIDIA Other")
    assert _resolve(_x(), "lstm", 256) == ("step", None)


def test_lookup_follows_auto_path_on_a_miss(fake_cuda, policy, monkeypatch):
    policy({"lstm": {"fp16": {"B<=16,H<=256": {"path": "step"}}}})
    monkeypatch.setattr(_paths, "AUTO_PATH", "adaptive")
    assert _resolve(_x(), "lstm", 256)[0] == "step"  # the table's hit wins
    assert _resolve(_x(), "rnn", 256)[0] == "persistent"  # a miss: AUTO_PATH


def test_explicit_requests_ignore_the_table(fake_cuda, policy, monkeypatch):
    policy({"lstm": {"fp16": {"B<=16,H<=256": {"path": "persistent"}}}})
    assert _paths.resolve("op", "graph", _x(), lambda: (object(), ""), "lstm", 256) == ("graph", None)
    monkeypatch.setenv(_paths.ENV_VAR, "step")
    assert _resolve(_x(), "lstm", 256) == ("step", None)


def test_cpu_tensors_ignore_the_table(policy, monkeypatch):
    monkeypatch.delenv(_paths.ENV_VAR, raising=False)
    policy({c: {"fp32": {"B<=16,H<=256": {"path": "persistent"}}} for c in _paths.POLICY_CELLS})

    def no_call(device):
        raise AssertionError("a CPU tensor asked for a device name")

    monkeypatch.setattr(_paths, "device_name", no_call)
    assert _resolve(_x(dtype=torch.float32), "lstm", 256) == ("step", None)


def test_a_hit_that_cannot_run_falls_back_silently(fake_cuda, policy, monkeypatch):
    policy({"lstm": {"fp16": {"B<=16,H<=256": {"path": "persistent"}}},
            "rnn": {"fp16": {"B<=16,H<=256": {"path": "graph"}}}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _resolve(_x(), "lstm", 256, (None, "no room")) == ("step", None)
        monkeypatch.setattr(_paths, "graph_unavailable", lambda x: ("the Triton interpreter is on", True))
        assert _resolve(_x(), "rnn", 256) == ("step", None)
    # the explicit request still warns
    with pytest.warns(RuntimeWarning, match="graph path not possible"):
        _paths.resolve("op", "graph", _x(), lambda: (None, ""), "rnn", 256)


def test_device_name_asked_once_per_index(monkeypatch):
    calls = []
    monkeypatch.setattr(_paths, "_device_names", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: calls.append(i) or f"card {i}")
    assert _paths.device_name(torch.device("cuda", 1)) == "card 1"
    assert _paths.device_name(torch.device("cuda", 1)) == "card 1"
    assert _paths.device_name(torch.device("cuda", 0)) == "card 0"
    assert calls == [1, 0]


@requires_kernels
@pytest.mark.parametrize("layer, cell, hidden", [
    (lambda: fused_rnn.LSTM(3, 6, backend="triton"), "lstm", 6),
    (lambda: fused_rnn.LSTM(3, 6, layer_norm=True, backend="triton"), "lnlstm", 6),
    (lambda: fused_rnn.LSTM(3, 6, proj_size=4, backend="triton"), "lstm_proj", 6),
    (lambda: fused_rnn.RNN(3, 6, backend="triton"), "rnn", 6),
])
def test_ops_pass_their_policy_key(monkeypatch, layer, cell, hidden):
    """Every op's forward and backward hands resolve() its cell and hidden size."""
    seen = []
    real = _paths.measured_path
    monkeypatch.setattr(_paths, "measured_path", lambda x, c, h: seen.append((c, h)) or real(x, c, h))
    dev = kernel_device()
    m = layer().to(dev)
    m(torch.randn(4, 2, 3, device=dev))[0].sum().backward()
    assert seen == [(cell, hidden)] * 2


# ----------------------------------------------------------------------------------- the writer
def _row(cell, shape, B, H, dtype, method, fwd, fwdbwd, **kw):
    return {"cell": cell, "shape": shape, "B": B, "T": 64, "H": H, "dtype": dtype, "kind": "fused",
            "method": method, "fwd_ms": fwd, "fwdbwd_ms": fwdbwd, "status": "ok", "fallback": False, **kw}


def _bench(gpu=CARD, device="cuda"):
    rows = [
        # lstm fp16, B<=16,H<=256: S1 persistent wins, S5 graph wins; tie on wins, persistent's total smaller
        _row("lstm", "S1", 16, 256, "fp16", "triton", 1.0, 10.0),
        _row("lstm", "S1", 16, 256, "fp16", "graph", 0.8, 8.0),
        _row("lstm", "S1", 16, 256, "fp16", "persistent", 0.5, 5.0, notes=["plans: fwd 16x1 programs"]),
        _row("lstm", "S5", 8, 200, "fp16", "triton", 1.0, 4.0),
        _row("lstm", "S5", 8, 200, "fp16", "graph", 1.0, 3.5),
        _row("lstm", "S5", 8, 200, "fp16", "persistent", 1.0, 3.9),
        # rnn bf16 S2: the persistent row fell back (ignored), graph has no fwd+bwd: no comparison
        _row("rnn", "S2", 64, 512, "bf16", "triton", 2.0, 3.0),
        _row("rnn", "S2", 64, 512, "bf16", "graph", 0.1, None),
        _row("rnn", "S2", 64, 512, "bf16", "persistent", 0.1, 0.1, fallback=True),
        _row("rnn", "S2", 64, 512, "bf16", "triton-recompute", 0.1, 0.1),
        _row("rnn", "S4", 16, 768, "bf16", "persistent", 0.1, 4.0),
        _row("rnn", "S4", 16, 768, "bf16", "triton", 0.2, 3.0),
        # lstm_proj fp16: fwd only, graph wins
        _row("lstm_proj", "S3", 256, 1024, "fp16", "triton", 5.0, None),
        _row("lstm_proj", "S3", 256, 1024, "fp16", "graph", 4.0, None),
        # lnlstm fp32: one path timed: no entry; a baseline row is no path of ours
        _row("lnlstm", "S3", 256, 1024, "fp32", "triton", 5.0, 9.0),
        dict(_row("lstm", "S3", 256, 1024, "fp32", "cudnn", 0.1, 0.1), kind="nn"),
        _row("lstm", "S3", 256, 1024, "fp32", "triton", 5.0, 9.0),
    ]
    machine = {"gpu": gpu if device == "cuda" else None, "device": device, "git": "abc1234",
               "date": "2025-06-01 12:00 UTC", "torch": "2.11", "triton": "3.6", "cuda": "12.8"}
    return {"config": {"mode": "gpu"}, "machine": machine, "results": rows}


def test_writer_entries():
    w = _writer()
    gpu, dev = w.device_policy(_bench())
    assert gpu == CARD and dev["source"]["date"] == "2025-06-01 12:00 UTC" and "abc1234" in dev["source"]["run"]
    paths = {(c, d, s): e["path"] for c, by_d in dev["entries"].items() for d, by_s in by_d.items()
             for s, e in by_s.items()}
    assert paths == {
        ("lstm", "fp16", "B<=16,H<=256"): "persistent",
        ("rnn", "bf16", "B<=16,H<=1024"): "step",
        ("lstm_proj", "fp16", "B>64,H<=1024"): "graph",
    }
    e = dev["entries"]["lstm"]["fp16"]["B<=16,H<=256"]
    assert [m["shape"] for m in e["measured"]] == ["S1 (B16,H256)", "S5 (B8,H200)"]
    assert e["measured"][0] == {"shape": "S1 (B16,H256)", "mode": "fwd+bwd", "fastest": "persistent",
                                "ms": {"graph": 8.0, "persistent": 5.0, "step": 10.0},
                                "kernels": "plans: fwd 16x1 programs"}
    assert e["measured"][1]["fastest"] == "graph" and "kernels" not in e["measured"][1]
    assert dev["entries"]["lstm_proj"]["fp16"]["B>64,H<=1024"]["measured"][0]["mode"] == "fwd"


def test_writer_merges_and_the_policy_reads_it(tmp_path, fake_cuda, monkeypatch):
    w = _writer()
    bench, out = tmp_path / "bench.json", tmp_path / "policy.json"
    bench.write_text(json.dumps(_bench()))
    other = _table({"rnn": {"fp32": {"B<=16,H<=256": {"path": "graph"}}}}, card="NVIDIA Other")
    stale = copy.deepcopy(other)
    stale["devices"][CARD] = {"source": {"run": "old", "date": "2000"},
                              "entries": {"lnlstm": {"fp16": {"B<=16,H<=256": {"path": "graph"}}}}}
    out.write_text(json.dumps(stale))
    assert w.main([str(bench), str(out)]) == 0
    table = _paths.validate_policy(json.loads(out.read_text()))
    assert table["devices"]["NVIDIA Other"] == other["devices"]["NVIDIA Other"]
    assert "lnlstm" not in table["devices"][CARD]["entries"]  # this card's old entries replaced
    assert CARD in table["status"]
    monkeypatch.setattr(_paths, "_policy", table)
    assert _resolve(_x(), "lstm", 128)[0] == "persistent"
    assert _resolve(_x(B=256), "lstm_proj", 1024) == ("graph", None)


def test_writer_refuses_a_cpu_run_or_no_comparison(tmp_path):
    w = _writer()
    out = tmp_path / "policy.json"
    for data in (_bench(device="cpu"), {**_bench(), "results": _bench()["results"][-3:]}):
        bench = tmp_path / "bench.json"
        bench.write_text(json.dumps(data))
        assert w.main([str(bench), str(out)]) == 1
    assert not out.exists()
    assert w.main([]) == 2
