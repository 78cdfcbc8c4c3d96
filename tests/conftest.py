"""Shared test helpers.

Kernel tests run on whatever device can run Triton here: a CUDA GPU, or the CPU through the
Triton interpreter (TRITON_INTERPRET=1, set before Python starts, as .ci/run does). Where neither
is available they are skipped, and the reference-path tests still run.
"""
import contextlib
import os

import pytest
import torch

from fused_rnn._backend import interpreter_broken

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()


# Why the Triton interpreter cannot run the kernels in this environment, or None (a cached probe).
INTERPRETER_BROKEN = interpreter_broken()


def pytest_configure(config):
    # The interpreter lane with an interpreter that cannot run the kernels (Triton 3.6 with
    # NumPy >= 2.3) would fail every kernel test for a reason outside the code: stop, saying why.
    if INTERPRET and INTERPRETER_BROKEN:
        raise pytest.UsageError(f"TRITON_INTERPRET=1, but {INTERPRETER_BROKEN}")


# The `fused-rnn check` subprocess tests that run the kernels through the interpreter: on a GPU
# machine whose Triton interpreter cannot (its Triton 3.6 with NumPy 2.5), they say why and skip;
# the CPU lanes run them.
requires_working_interpreter = pytest.mark.skipif(
    INTERPRETER_BROKEN is not None, reason=f"Triton interpreter unusable here: {INTERPRETER_BROKEN}"
)


def kernel_device():
    """The device the Triton kernels run on in this session, or None."""
    if HAS_CUDA:
        return torch.device("cuda")
    if INTERPRET:
        return torch.device("cpu")
    return None


requires_kernels = pytest.mark.skipif(
    kernel_device() is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1"
)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DT_NAME = {F64: "fp64", F32: "fp32", F16: "fp16", BF16: "bf16"}


# The kernel tests' shapes (test_lstm, test_rnn): (id, T, B, I, H, lengths, bias). H not a power
# of two, B not a multiple of 16 (B=17 spans two row blocks), T = 1, a zero length, a length > T
# (runs to the end), no bias.
STEP_SHAPES = (
    ("B3-T7-H37-len", 7, 3, 5, 37, [7, 3, 0], True),
    ("B17-T3-H20-len", 3, 17, 4, 20, [3, 1, 2, 3, 0, 1, 2, 3, 3, 2, 1, 5, 2, 2, 1, 3, 1], True),
    ("B5-T1-H16", 1, 5, 5, 16, None, True),
    ("B2-T4-H7-nobias", 4, 2, 3, 7, None, False),
)


def tol(dtype):
    """Relative-error bound of a kernel against the fp64 reference, per dtype: fp64 1e-10;
    fp32 1e-5 under the interpreter, 1e-4 on a GPU (5e-3 with TF32 on); fp16 / bf16 2e-2."""
    if dtype == F64:
        return 1e-10
    if dtype == F32:
        dev = kernel_device()
        if dev is not None and dev.type == "cuda":
            return 5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
        return 1e-5
    return 2e-2


@pytest.fixture
def poison():
    """Kernel launchers allocate every buffer they must fill as NaN (options().poison), so an
    element a kernel leaves unwritten fails the comparison."""
    from fused_rnn.kernels import config

    with config.using(poison=True):
        yield


@contextlib.contextmanager
def force_step_tile(monkeypatch, kernels_module, **tile):
    """Inside the block the step kernels take ``tile`` (options().step_tiles: BLOCK_B, BLOCK_H,
    BLOCK_K, num_warps), and kernels_module's tile rule (kernels.lstm's lstm_blocks or
    kernels.rnn's rnn_blocks) is spied on: yields the list its calls append their tiles to."""
    from fused_rnn.kernels import config

    name = "lstm_blocks" if hasattr(kernels_module, "lstm_blocks") else "rnn_blocks"
    tiles, blocks = [], getattr(kernels_module, name)
    monkeypatch.setattr(kernels_module, name, lambda *a, **k: tiles.append(blocks(*a, **k)) or tiles[-1])
    with config.using(step_tiles=tile):
        yield tiles


def assert_deterministic(fn, ins, lengths, ups):
    """Two identical calls of fn: bitwise-identical outputs and gradients (fwd_bwd's)."""
    first, second = fwd_bwd(fn, ins, lengths, ups), fwd_bwd(fn, ins, lengths, ups)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def launch_plan(path, direction, x, w_hh, ln=None, fused=True):
    """The ``plan`` a kernels launcher takes for ``path``, as the ops resolve it: None on "step",
    else this problem's persistent plan (None where it cannot run: the step loop)."""
    if path == "step":
        return None
    from fused_rnn.kernels import lstm, rnn

    B, H = x.shape[1], w_hh.shape[1]
    if w_hh.shape[0] == 4 * H:
        return lstm.persistent_plan(direction, B, H, ln, fused, x.dtype, x.device)[0]
    return rnn.persistent_plan(direction, B, H, fused, x.dtype, x.device)[0]


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ in fp64 (0 when both are zero)."""
    a = a.detach().double()
    b = b.detach().double()
    denom = b.norm()
    diff = (a - b).norm()
    if denom == 0:
        return float(diff)
    return float(diff / denom)


def fwd_bwd(fn, ins, L, ups, dtype=None):
    """Outputs and gradients of every tensor input (None entries skipped) for the loss
    Σ (out_k · up_k) over fn's outputs. ``dtype``: run on copies in that dtype (the fp64
    reference)."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ins]
    outs = fn(leaves, L)
    loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, ups))
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [o.detach() for o in outs], list(grads)


def assert_close(ours, ref, tolerance, names):
    """Each pair: same shape, no NaN (an unwritten element), relative error within tolerance."""
    for a, b, n in zip(ours, ref, names):
        assert a.shape == b.shape, n
        assert not torch.isnan(a).any(), f"{n}: NaN (an unwritten element?)"
        e = rel_err(a, b)
        assert e <= tolerance, f"{n}: rel err {e:.3e} > {tolerance:.1e}"


def assert_matches_reference(kernel_fn, reference_fn, ins, L, ups, names, out_names):
    """A kernel path against the reference run in fp64 on the same inputs: outputs in the
    inputs' dtype, each gradient in its input's dtype and shape, relative errors within
    tol(dtype), and zero output past each sequence's end. ``names``: one per entry of ``ins``
    (None entries included)."""
    dtype = ins[0].dtype
    outs, grads = fwd_bwd(kernel_fn, ins, L, ups)
    r_outs, r_grads = fwd_bwd(reference_fn, ins, L, ups, dtype=torch.float64)
    for o in outs:
        assert o.dtype == dtype
    present = [(t, n) for t, n in zip(ins, names) if t is not None]
    for g, (t, n) in zip(grads, present):
        assert g.dtype == t.dtype and g.shape == t.shape, n
    assert_close(outs, r_outs, tol(dtype), out_names)
    assert_close(grads, r_grads, tol(dtype), [n for _, n in present])
    if L is not None:  # steps past a sequence's end write zero output
        t_idx = torch.arange(outs[0].shape[0], device=L.device).unsqueeze(1)
        assert (outs[0][t_idx >= L.unsqueeze(0)] == 0).all()
    return outs


def _ptxas_available():
    try:
        import triton
    except Exception:  # no triton: nothing to compile with
        return False
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(bundled) or bool(os.environ.get("TRITON_PTXAS_PATH"))


# Compiling for an H100 without one: not under the interpreter (its kernels are Python, nothing to
# compile) and not on a GPU machine (there the kernels run for real, and a Triton whose compile
# API differs must not stop the CUDA lane).
requires_sm90_compile = pytest.mark.skipif(
    INTERPRET or HAS_CUDA or not _ptxas_available(),
    reason="CPU lane without TRITON_INTERPRET, with Triton's bundled ptxas",
)


def compile_sm90(kernel, signature, constexprs, **options):
    """Compile a @triton.jit kernel (or its @triton.heuristics wrapper) for sm_90 with the
    installed Triton and its bundled ptxas; returns the compiled kernel (.asm["ptx"], .n_regs...).
    ``signature``: the non-constexpr arguments' types; ``constexprs``: the rest, None included."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def triton_36() -> bool:
    """Whether the installed Triton is 3.6 (the GPU machine's), whose sm_90 register allocation
    some compile tests record separately; False without Triton."""
    try:
        import triton
    except ImportError:
        return False
    return triton.__version__.startswith("3.6.")


def ptxas_usage(compiled):
    """(registers, spill-store bytes) of a compiled sm_90 kernel, from ``ptxas -v`` on its PTX with
    the ptxas Triton itself uses for sm_90; None when this Triton does not expose that tool."""
    import re
    import subprocess
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception:  # an older Triton: no such helper (the caller then skips this check)
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                           capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    assert regs and spill, r.stderr
    return int(regs.group(1)), int(spill.group(1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A watchdog per test (pytest-timeout is not a dependency): the persistent kernels' programs wait
# for each other (a grid barrier, or the LL exchange's spin on tagged words), so a protocol bug
# hangs instead of failing. Past TEST_WATCHDOG_S one test dumps every thread's stack and ends the
# run with an error, instead of holding CI for its whole time limit. (The slowest test takes
# well under a minute on the CI machine.)
TEST_WATCHDOG_S = float(os.environ.get("FUSED_RNN_TEST_WATCHDOG_S", "900"))


@pytest.fixture(autouse=True)
def _watchdog(request):
    import faulthandler
    import sys
    import threading

    capman = request.config.pluginmanager.getplugin("capturemanager")

    def fire():
        if capman is not None:  # the real stderr, not pytest's capture (lost at os._exit)
            capman.suspend_global_capture(in_=True)
        sys.stderr.write(f"\nWATCHDOG: {request.node.nodeid} still running after {TEST_WATCHDOG_S:.0f} s "
                         "(a hang?); the stacks of every thread:\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(all_threads=True)
        os._exit(1)

    timer = threading.Timer(TEST_WATCHDOG_S, fire)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
