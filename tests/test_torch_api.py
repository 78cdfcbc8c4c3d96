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


CELLS = {
    "lstm": lambda backend: fused_rnn.LSTM(3, 5, backend=backend),
    "lstm_proj": lambda backend: fused_rnn.LSTM(3, 5, proj_size=2, backend=backend),
    "lnlstm": lambda backend: fused_rnn.LSTM(3, 5, layer_norm=True, backend=backend),
    "rnn": lambda backend: fused_rnn.RNN(3, 5, backend=backend),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_in_place_on_the_output_then_backward(cell, backend):
    """out += 1 after the forward works and the gradients are those of the modified output, as
    with torch.nn (the triton backend's output was a view of a saved buffer: the in-place op
    raised)."""
    dev = _device(backend)
    torch.manual_seed(0)
    m = CELLS[cell](backend).double().to(dev)
    ref = CELLS[cell]("reference").double().to(dev)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=dev)
    grads = []
    for model in (m, ref):
        out, _ = model(x)
        out += 1
        out.pow(2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_not_copied_without_grad(backend):
    """Inference (nothing records a graph) returns the kernels' buffer itself: no copy."""
    dev = _device(backend)
    m = fused_rnn.LSTM(3, 5, backend=backend).to(dev)
    x = torch.randn(4, 2, 3, device=dev)
    with torch.no_grad():
        out, _ = m(x)
    out += 1  # in place, as on any output
    if backend == "triton":
        assert out._base is not None  # the saved-h buffer hs[1:]


@requires_kernels
def test_lstm_sequence_copy_output():
    """The functional form copies its output where autograd records it; copy_output=False keeps
    the kernels' saved-h view, on which in-place ops raise."""
    from fused_rnn import lstm_sequence

    dev = kernel_device()
    T, B, I, H = 4, 2, 3, 5
    x = torch.randn(T, B, I, device=dev)
    h0, c0 = torch.zeros(B, H, device=dev), torch.zeros(B, H, device=dev)
    w_ih = torch.randn(4 * H, I, device=dev, requires_grad=True)
    w_hh = torch.randn(4 * H, H, device=dev, requires_grad=True)
    out, _, _ = lstm_sequence(x, h0, c0, w_ih, w_hh, backend="triton")
    out += 1
    out.sum().backward()
    view, _, _ = lstm_sequence(x, h0, c0, w_ih, w_hh, backend="triton", copy_output=False)
    with pytest.raises(RuntimeError):
        view += 1
