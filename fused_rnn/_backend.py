"""Backend choice, shared by every layer and functional entry point."""
from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import warnings
from collections import OrderedDict
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "reference")

WARN_KEYS_MAX = 256
_warned: "OrderedDict[str, None]" = OrderedDict()
_warned_lock = threading.Lock()


def interpreter_on() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def allow_tf32(x: torch.Tensor) -> bool:
    """fp32 tl.dot follows torch's cuBLAS TF32 switch (CPU: the interpreter is exact anyway)."""
    return bool(x.is_cuda and x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (only whether it imports)
    except Exception:  # ImportError, or a broken install: the reference path still works
        return False
    return True


@functools.lru_cache(maxsize=None)
def interpreter_broken() -> Optional[str]:
    """Why this Triton's interpreter cannot run fused_rnn's kernels here, or None when it can.

    Triton 3.6's interpreter turns a runtime int argument (a loop bound) into a Python int by
    int() of a 1-element NumPy array, which NumPy 2.3 and later refuse; Triton 3.9's does not.
    One tiny kernel with such a loop, run through the interpreter on CPU tensors, tells."""
    try:
        import numpy
        import triton
        from triton.runtime.interpreter import InterpretedFunction

        from .kernels._common import interpreter_probe_kernel as probe
    except Exception as e:  # no triton / numpy: nothing interprets at all
        return f"the Triton interpreter does not import ({type(e).__name__}: {e})"
    x = torch.zeros(4)
    y = torch.full((4,), -1.0)
    try:
        InterpretedFunction(probe.fn)[(1,)](x, y, 3, BLOCK=4)  # .fn: the Python function under @triton.jit
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        hint = "; Triton 3.6's interpreter needs numpy<2.3" if "0-dimensional arrays" in first else ""
        return (f"the Triton interpreter of triton {triton.__version__} fails with numpy "
                f"{numpy.__version__} ({first}){hint}")
    if y.tolist() != [1.0, 1.0, 1.0, -1.0]:
        return f"the Triton interpreter of triton {triton.__version__} computed a probe kernel wrong: {y.tolist()}"
    return None


FUNCTORCH_MESSAGE = (
    "fused_rnn: backend='triton' cannot run under torch.func transforms (grad, vjp, vmap, jacrev): "
    "the Triton kernels' autograd Functions have no functorch rule; run the layer with "
    "backend='reference' (or 'auto', which takes it under the transforms)"
)


def _functorch_transform_active() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, ...) is running (not while compiling:
    Dynamo handles the transforms itself)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Map the user's backend choice to "triton" or "reference" for tensor ``x``.

    "auto": the Triton kernels on CUDA tensors, the reference path elsewhere.
    "triton": the kernels; on CPU tensors only under TRITON_INTERPRET=1 (how CI tests them).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if _functorch_transform_active():
        # the Functions' hand-written backward has no functorch (vmap / grad / jvp) rule
        if backend == "triton":
            raise RuntimeError(FUNCTORCH_MESSAGE)
        warn_once("functorch", "fused_rnn: torch.func transforms cannot run the Triton kernels (their "
                               "autograd Functions have no functorch rule); using the reference path")
        return "reference"
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not importable")
    if not x.is_cuda and not interpreter_on():
        raise RuntimeError(
            "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 (the Triton interpreter); "
            "use backend='auto' or 'reference' for the CPU reference path"
        )
    if not x.is_cuda and not torch.compiler.is_compiling():  # (a probe launch cannot be traced)
        broken = interpreter_broken()
        if broken:
            raise RuntimeError(f"backend='triton' on a CPU tensor runs the Triton interpreter, and {broken}; "
                               "use backend='auto' or 'reference' for the CPU reference path")
    return "triton"


def aten_route(backend: str, x: torch.Tensor) -> bool:
    """Whether ``backend`` on ``x`` runs torch's own ATen RNN/LSTM ops (fused_rnn/aten.py) for a
    configuration torch.nn computes: "auto" on a CPU tensor, where it resolved to the reference
    path before: not under TRITON_INTERPRET=1 (which tests the kernels on CPU), a torch.func
    transform (which warns and takes the reference path) or torch.compile (which traces the
    reference loop)."""
    return (backend == "auto" and x.device.type == "cpu" and not interpreter_on()
            and not torch.compiler.is_compiling() and not _functorch_transform_active())


def warn_once(key: str, message: str) -> None:
    """A warning printed once per process for each cause: ``key`` with its numbers taken out, so
    a fallback warns once, not once per shape. Thread-safe; at most WARN_KEYS_MAX causes kept."""
    cause = re.sub(r"\d+(\.\d+)?", "#", key)
    with _warned_lock:
        if cause in _warned:
            return
        _warned[cause] = None
        while len(_warned) > WARN_KEYS_MAX:
            _warned.popitem(last=False)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def warnings_unsuppressed():
    """Inside the block every cause warns again (the record of those already warned is set aside
    and put back after): for callers that collect the warnings of one call."""
    global _warned
    with _warned_lock:
        saved, _warned = _warned, OrderedDict()
    try:
        yield
    finally:
        with _warned_lock:
            _warned = saved


# ------------------------------------------------------------------------- double backward

def double_backward_via(reference):
    """Decorator for a hand-written autograd backward whose kernels have no derivative.

    A plain backward (grad mode off inside it) runs as is, as does a traced one (torch.compile).
    Under create_graph=True (grad mode on) the gradients come instead from a differentiable
    route: ``reference(ctx)`` returns the forward's leading tensor arguments, as saved, and a
    function of them that re-runs the forward on the reference path; the vjp of that, taken with
    create_graph, gives second derivatives exactly (its first-order values match the kernels'
    within their tolerance). That recompute is the cost, paid only when create_graph asks."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():
                return backward(ctx, *grad_outputs)
            return _reference_vjp(ctx, reference, grad_outputs)

        return wrapper

    return decorate


def _reference_vjp(ctx, reference, grad_outputs):
    """The gradients a backward returns, from the reference path's graph (kept: create_graph),
    which reads none of the kernels' saved sequences (the LSTM's consumed gates included)."""
    inputs, forward = reference(ctx)
    need = ctx.needs_input_grad
    wrt = [i for i, t in enumerate(inputs) if need[i] and t is not None and t.requires_grad]
    grads = [None] * len(need)
    # in the saved dtypes, not autocast's (which a CPU backward would otherwise run under)
    with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
        # a node per argument: one tensor passed twice (h0 as c0, b_ih as b_hh) gets each share
        inputs = [t.view_as(t) if i in wrt else t for i, t in enumerate(inputs)]
        outputs = forward(*inputs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
        if wrt and pairs:
            found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wrt], [g for _, g in pairs],
                                        create_graph=True, allow_unused=True)
            for i, g in zip(wrt, found):
                grads[i] = g
    return tuple(grads)
