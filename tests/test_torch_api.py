"""The layers under torch's other APIs, as torch.nn's behave: torch.func transforms, in-place
ops on the outputs."""
import pytest
import torch
from torch.func import functional_call

import fused_rnn
from conftest import kernel_device, requires_kernels

BACKENDS = ["reference", pytest.param("triton", marks=requires_kernels)]


def _device(backend):
    return kernel_device() if backend == "triton" else torch.device("cpu")


def _func_grad(model, x):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return functional_call(model, p, (x,))[0].pow(2).sum()

    return torch.func.grad(loss)(params)


def test_func_grad_reference_matches_autograd():
    torch.manual_seed(0)
    m = fused_rnn.LSTM(3, 4, backend="reference").double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    grads = _func_grad(m, x)
    m(x)[0].pow(2).sum().backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(grads[k], p.grad)


@requires_kernels
@pytest.mark.parametrize("make", [lambda: fused_rnn.LSTM(3, 4, backend="triton"),
                                  lambda: fused_rnn.RNN(3, 4, backend="triton")], ids=["lstm", "rnn"])
def test_func_grad_triton_backend_says_what_to_use(make):
    dev = kernel_device()
    m = make().to(dev)
    x = torch.randn(5, 2, 3, device=dev)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        _func_grad(m, x)
