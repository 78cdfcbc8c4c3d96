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


# An H100 as Triton's launch sees it (compile_sm90): the driver's current target, device and
# stream, and nothing else of a driver
class _Sm90Driver:
    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return "sm90-compile-only"  # a key of its own in each kernel's per-device caches

    def get_current_stream(self, device):
        return 0


class _Launched(Exception):
    """What JITFunction.run passed to its compile: (itself, signature, constexprs, options, attrs)."""


class Ptr:
    """A pointer argument as compile_sm90 takes it: a tensor's dtype and its data_ptr's offset in
    bytes from a (256-byte aligned) CUDA allocation."""

    def __init__(self, dtype, offset=0):
        self.dtype, self.offset = dtype, offset

    def data_ptr(self):
        return 1 << 20 | self.offset


def sm90_launch(launch):
    """(JITFunction, signature, constexprs, options, attrs) that Triton's own launch path computes
    for the first kernel ``launch()`` launches, as on an H100: it runs up to that kernel's compile
    under a stand-in sm_90 driver (through @triton.heuristics and a launcher's Python too), which
    hands over what it would compile instead. Raises if this Triton's launch path is not the one
    read here, or if ``launch`` launches nothing."""
    import inspect

    import triton
    from triton.runtime import jit
    from triton.runtime.driver import driver

    cls = jit.JITFunction
    params = list(inspect.signature(cls._do_compile).parameters)
    assert params == ["self", "key", "signature", "device", "constexprs", "options", "attrs", "warmup"], \
        f"Triton {triton.__version__}: JITFunction._do_compile{params} is not the one compile_sm90 reads"

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        raise _Launched(self, signature, constexprs, options, attrs)

    saved, orig = driver._active, cls.__dict__["_do_compile"]
    driver.set_active(_Sm90Driver())
    cls._do_compile = do_compile
    try:
        launch()
    except _Launched as e:
        return e.args
    finally:
        cls._do_compile = orig
        driver.set_active(saved)
    raise AssertionError(f"{launch}: launched no kernel")


def sm90_specialization(kernel, args, **options):
    """sm90_launch of ``kernel[grid](**args, **options)``. ``args``: every argument by name, with
    its launch value: a tensor, a Ptr, or "*bf16" (a base pointer of an allocation, as every
    launcher passes), ints (B, H: Triton specialises == 1 and % 16), floats, constexprs."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
              "i64": torch.int64, "i32": torch.int32}
    vals = {}
    for k, v in args.items():
        if isinstance(v, str):
            assert v.startswith("*"), f"{k}={v!r}: give a scalar's launch value (Triton specialises on it)"
            v = Ptr(dtypes[v[1:]])
        vals[k] = v
    return sm90_launch(lambda: kernel[(1,)](**vals, **options))


def compile_sm90(kernel, args, constexprs=None, **options):
    """Compile a @triton.jit kernel (or its @triton.heuristics wrapper) for sm_90 with the
    installed Triton and its bundled ptxas exactly as ``kernel[grid](**args, **constexprs,
    **options)`` would on an H100 (sm90_specialization: the same signature, constants and
    tt.divisibility attributes); returns the compiled kernel (.asm["ptx"], .n_regs...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, consts, opts, attrs = sm90_specialization(kernel, {**args, **(constexprs or {})}, **options)
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options=opts.__dict__)


def triton_36() -> bool:
    """Whether the installed Triton is 3.6 (the GPU machine's), whose sm_90 register allocation
    some compile tests record separately; False without Triton."""
    try:
        import triton
    except ImportError:
        return False
    return triton.__version__.startswith("3.6.")


def res_usage(compiled) -> dict:
    """REG, STACK, SHARED... of a compiled sm_90 kernel's cubin (the binary Triton built, with its
    own ptxas options), from the cuobjdump bundled with Triton; {} when it bundles none."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED):(\d+)", text)}


def ptxas_usage(compiled):
    """(registers, spilled bytes) of a compiled sm_90 kernel: its cubin's registers and stack
    bytes (res_usage; no kernel here keeps a local array, so stack is spills). Not ``ptxas -v`` on
    the PTX: Triton's own ptxas options change both (3.9 adds --regAllocOptLevel=2: the LSTM LL
    backward at S4, 90 registers and none spilled, reads 80 and 20 B there). None without cuobjdump."""
    use = res_usage(compiled)
    return (use["REG"], use["STACK"]) if use else None


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
