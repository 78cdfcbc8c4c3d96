"""Backend choice, shared by every layer and functional entry point."""
from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference")

_warned: set = set()


def interpreter_on() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (only whether it imports)
    except Exception:  # ImportError, or a broken install: the reference path still works
        return False
    return True


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Map the user's backend choice to "triton" or "reference" for tensor ``x``.

    "auto": the Triton kernels on CUDA tensors, the reference path elsewhere.
    "triton": the kernels; on CPU tensors only under TRITON_INTERPRET=1 (how CI tests them).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
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
    return "triton"


def warn_once(key: str, message: str) -> None:
    """A warning printed once per process for each distinct ``key``."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
