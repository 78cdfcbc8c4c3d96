"""The environment probe: whether the Triton interpreter can run the kernels here, and what a
user gets when it cannot (Triton 3.6's interpreter with NumPy 2.3 or later: the GPU machine's
image has exactly that pair, so its CUDA lane skips the interpreter's subprocess tests)."""
import os

import numpy
import pytest
import torch

import fused_rnn
from fused_rnn import _backend, cli

BROKEN = ("the Triton interpreter of triton 3.6.0 fails with numpy 2.5.2 (TypeError('only "
          "0-dimensional arrays can be converted to Python scalars')); Triton 3.6's interpreter "
          "needs numpy<2.3")


def _version(s):
    return tuple(int(p) for p in s.split(".")[:2])


def test_probe_agrees_with_the_known_incompatibility():
    triton = pytest.importorskip("triton")
    got = _backend.interpreter_broken()
    tv, nv = _version(triton.__version__), _version(numpy.__version__)
    if tv == (3, 6) and nv >= (2, 3):
        assert got and "only 0-dimensional arrays" in got and numpy.__version__ in got
    elif tv == (3, 6) or tv >= (3, 9):  # the versions this project runs on; both work here
        assert got is None, got


class _FakeInterpreted:
    """Stands in for triton's InterpretedFunction: a launch raises ``error`` or does nothing."""

    error = None

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.error is not None:
                raise self.error

        return launch


@pytest.mark.parametrize("error", [TypeError("only 0-dimensional arrays can be converted to Python scalars"), None],
                         ids=["raises", "writes-nothing"])
def test_probe_reports_a_failing_or_wrong_interpreter(monkeypatch, error):
    interp = pytest.importorskip("triton.runtime.interpreter")
    monkeypatch.setattr(_FakeInterpreted, "error", error)
    monkeypatch.setattr(interp, "InterpretedFunction", _FakeInterpreted)
    got = _backend.interpreter_broken.__wrapped__()  # uncached
    if error is not None:
        assert "only 0-dimensional arrays" in got and f"numpy {numpy.__version__}" in got
        assert got.endswith("Triton 3.6's interpreter needs numpy<2.3")  # the hint for this error only
    else:
        assert "computed a probe kernel wrong" in got


def test_triton_backend_on_a_broken_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "interpreter_broken", lambda: BROKEN)
    m = fused_rnn.LSTM(3, 4, backend="triton")
    with pytest.raises(RuntimeError, match=r"runs the Triton interpreter, and .*needs numpy<2.3"):
        m(torch.randn(2, 1, 3))
    assert fused_rnn.LSTM(3, 4)(torch.randn(2, 1, 3))[0].shape == (2, 1, 4)  # auto: the reference


def test_check_on_a_broken_interpreter_exits_2_saying_why(monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as after the re-exec: no second one
    monkeypatch.setattr(_backend, "interpreter_broken", lambda: BROKEN)
    try:
        rc = cli.main(["check", "--quick", "--device", "cpu", "--cells", "rnn_tanh"])
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    assert rc == 2
    assert "through the Triton interpreter here" in captured.err and "needs numpy<2.3" in captured.err
    assert captured.out == ""  # no table of failures that would blame the kernels


def test_bench_skips_the_kernel_rows_on_a_broken_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from fused_rnn.bench import cases, paths

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(paths, "interpreter_broken", lambda: BROKEN)
    for name in ("triton", "persistent", "triton-recompute"):
        assert cases.PATHS[name].available(torch.device("cpu")) == BROKEN  # the row's skip reason


def test_every_package_ships():
    """pyproject's package list names every package of the source tree, so a wheel holds them all
    (the bench package was missing from it)."""
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    on_disk = {"fused_rnn.kernels"}  # kernels/ ships as fused_rnn.kernels (package-dir)
    for d, _, files in os.walk(os.path.join(root, "fused_rnn")):
        if "__init__.py" in files and not os.path.islink(d):
            on_disk.add(os.path.relpath(d, root).replace(os.sep, "."))
    assert listed == on_disk
