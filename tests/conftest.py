"""Shared test helpers.

Kernel tests run on whatever device can run Triton here: a CUDA GPU, or the CPU through the
Triton interpreter (TRITON_INTERPRET=1, set before Python starts, as .ci/run does). Where neither
is available they are skipped, and the reference-path tests still run.
"""
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()


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


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ in fp64 (0 when both are zero)."""
    a = a.detach().double()
    b = b.detach().double()
    denom = b.norm()
    diff = (a - b).norm()
    if denom == 0:
        return float(diff)
    return float(diff / denom)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
