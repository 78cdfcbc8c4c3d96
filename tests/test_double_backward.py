"""Second derivatives (create_graph=True) through every cell on every backend.

On the triton backend a backward under grad mode takes the reference path's vjp
(fused_rnn._backend.double_backward_via); a plain backward still runs the kernels. fp64
gradgradcheck on tiny shapes: in full on the reference path, in fast mode (one random
projection) through the kernels, where each evaluation runs the interpreted forward.
"""
import pytest
import torch
from torch import nn
from torch.autograd import gradgradcheck

import fused_rnn
from conftest import kernel_device, rel_err, requires_kernels, tol
from fused_rnn.lstm import lstm_sequence
from fused_rnn.rnn import rnn_sequence

T, B, I, H, P = 3, 2, 2, 3, 2
LENGTHS = [3, 2]  # one sequence shorter than T

# cell: (gates, layer norm, proj_size, nonlinearity, biases)
CELLS = {
    "lstm": (4, False, 0, None, True),
    "lnlstm": (4, True, 0, None, True),
    "lstm_proj-nobias": (4, False, P, None, False),
    "lnlstm_proj": (4, True, P, None, True),
    "rnn_tanh": (1, False, 0, "tanh", True),
    "rnn_relu": (1, False, 0, "relu", True),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on these tiny tensors a parallel region only costs (layer_norm on a
    [2, 3] tensor: 20 ms with 2 busy threads against 7 µs with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _case(cell, device, dtype=torch.float64):
    """(the sequence function of the inputs, the inputs, all requiring grad, None where absent)."""
    G, ln, proj, nonlin, bias = CELLS[cell]
    hw = proj or H

    def t(*shape, mean=0.0):
        return (torch.randn(*shape, dtype=dtype, device=device) + mean).requires_grad_()

    lengths = torch.tensor(LENGTHS, device=device)
    x, h0, w_ih, w_hh = t(T, B, I), t(B, hw), t(G * H, I), t(G * H, hw)
    b_ih, b_hh = (t(G * H), t(G * H)) if bias else (None, None)
    if nonlin is not None:
        return (lambda backend: lambda *a: rnn_sequence(*a, lengths=lengths, nonlinearity=nonlin, backend=backend),
                [x, h0, w_ih, w_hh, b_ih, b_hh])
    c0 = t(B, H)
    extra = [t(4 * H, mean=1.0), t(4 * H), t(H, mean=1.0), t(H)] if ln else []
    w_hr = [t(P, H)] if proj else []

    def fn(backend):
        def run(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *rest):
            return lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln=tuple(rest[:4]) if ln else None,
                                 lengths=lengths, backend=backend, w_hr=rest[-1] if proj else None)
        return run

    return fn, [x, h0, c0, w_ih, w_hh, b_ih, b_hh] + extra + w_hr


def _gradgradcheck(cell, backend, device, fast_mode):
    """gradgradcheck in every input at once: they are slices of one flat tensor, so that fast
    mode runs the interpreted forward a few times, not a few times per input (and the kernels'
    Function sees inputs that are views, as a layer's cast weights are)."""
    fn, ins = _case(cell, device)
    f = fn(backend)
    present = [a.detach() for a in ins if a is not None]
    flat = torch.cat([a.flatten() for a in present]).requires_grad_()

    def g(flat):
        parts = iter(flat.split([a.numel() for a in present]))
        return f(*(None if a is None else next(parts).view(a.shape) for a in ins))

    assert gradgradcheck(g, [flat], fast_mode=fast_mode)


@pytest.mark.parametrize("cell", list(CELLS))
def test_gradgradcheck_reference(cell):
    _gradgradcheck(cell, "reference", "cpu", fast_mode=False)


@requires_kernels
@pytest.mark.parametrize("cell", list(CELLS))
def test_gradgradcheck_triton(cell):
    _gradgradcheck(cell, "triton", kernel_device(), fast_mode=True)


def _loss(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in outs)


@requires_kernels
@pytest.mark.parametrize("cell", ["lstm", "lnlstm_proj", "rnn_tanh"])
def test_create_graph_gradients_match_the_kernels(cell):
    """Under create_graph the first-order gradients (the reference's) match the kernels' plain
    backward; each plain backward of the same graph, before or after (the LSTM's first one writes
    over its saved gates), is the kernels' own, bit for bit, and keeps no graph; the second
    derivatives do not depend on the order."""
    fn, all_ins = _case(cell, kernel_device())
    outs = fn("triton")(*all_ins)
    ins = [a for a in all_ins if a is not None]
    plain = torch.autograd.grad(_loss(outs), ins, retain_graph=True)
    assert not any(g.requires_grad for g in plain)
    graphed = torch.autograd.grad(_loss(outs), ins, retain_graph=True, create_graph=True)
    assert all(g.requires_grad for g in graphed)
    plain_again = torch.autograd.grad(_loss(outs), ins, retain_graph=True)
    for a, b, c in zip(plain, graphed, plain_again):
        assert torch.equal(a, c)
        assert rel_err(b, a) <= tol(torch.float64)
    ref_outs = fn("reference")(*all_ins)
    ref_graphed = torch.autograd.grad(_loss(ref_outs), ins, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in graphed)
    ref_penalty = sum(g.pow(2).sum() for g in ref_graphed)
    for a, b in zip(torch.autograd.grad(penalty, ins), torch.autograd.grad(ref_penalty, ins)):
        assert rel_err(a, b) <= tol(torch.float64)


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_create_graph_dtypes_and_autocast(dtype):
    """The gradients come back in each input's dtype, close to the kernels' plain ones, and
    autocast around the backward changes nothing (the recompute runs in the saved dtypes)."""
    dev = kernel_device()
    fn, ins = _case("lnlstm", dev, dtype)
    outs = fn("triton")(*ins)
    plain = torch.autograd.grad(_loss(outs), ins, retain_graph=True)
    graphed = torch.autograd.grad(_loss(outs), ins, retain_graph=True, create_graph=True)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        cast = torch.autograd.grad(_loss(outs), ins, create_graph=True)
    for t, a, b, c in zip(ins, plain, graphed, cast):
        assert b.dtype == t.dtype and b.shape == t.shape
        assert rel_err(b, a) <= tol(dtype)
        assert torch.equal(b, c)


@requires_kernels
def test_one_tensor_as_two_arguments():
    """The same tensor passed as h0 and c0, and as both biases: under create_graph each argument
    gets its own share (not the tensor's whole gradient twice), as on the reference path."""
    dev = kernel_device()
    h, w_ih, w_hh, b = (torch.randn(*s, dtype=torch.float64, device=dev).requires_grad_()
                        for s in ((B, H), (4 * H, I), (4 * H, H), (4 * H,)))
    x = torch.randn(T, B, I, dtype=torch.float64, device=dev)
    leaves = [h, w_ih, w_hh, b]
    results = []
    for backend in ("triton", "reference"):
        outs = lstm_sequence(x, h, h, w_ih, w_hh, b, b, backend=backend)
        grads = torch.autograd.grad(_loss(outs), leaves, create_graph=True)
        results.append(grads + torch.autograd.grad(sum(g.pow(2).sum() for g in grads), leaves))
    for a, r in zip(*results):
        assert rel_err(a, r) <= 1e-10


def _penalty_grads(model, x, h0):
    """The weights' gradient of a gradient penalty: ‖∂loss/∂x‖² + ‖∂loss/∂h0‖²."""
    out, state = model(x, h0)
    hn = state[0] if isinstance(state, tuple) else state
    gx, gh = torch.autograd.grad(_loss([out, hn]), [x, h0[0] if isinstance(h0, tuple) else h0],
                                 create_graph=True)
    penalty = gx.pow(2).sum() + gh.pow(2).sum()
    return torch.autograd.grad(penalty, list(model.parameters()))


LAYERS = {
    "lstm": (nn.LSTM, fused_rnn.LSTM, {}),
    "lstm_proj": (nn.LSTM, fused_rnn.LSTM, {"proj_size": P}),
    "rnn_tanh": (nn.RNN, fused_rnn.RNN, {}),  # (ReLU's second derivative is 0: no bias gradient)
}
BACKENDS = ["reference", pytest.param("triton", marks=requires_kernels)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_gradient_penalty_matches_torch_nn(layer, backend):
    """A layer-level gradient penalty (WGAN-GP style) gives torch.nn's (CPU) weight gradients,
    on each backend: two layers, bidirectional, fp64."""
    nn_cls, our_cls, extra = LAYERS[layer]
    kw = dict(num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    ref = nn_cls(I, H, **kw)
    ours = our_cls(I, H, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    dev = kernel_device() if backend == "triton" else torch.device("cpu")
    ours.to(dev)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(4, B, extra.get("proj_size") or H, dtype=torch.float64)
    c0 = torch.randn(4, B, H, dtype=torch.float64)
    results = []
    for m, d in ((ref, "cpu"), (ours, dev)):
        xi, hi = x.to(d).requires_grad_(), h0.to(d).requires_grad_()
        state = (hi, c0.to(d)) if layer.startswith("lstm") else hi
        results.append(_penalty_grads(m, xi, state))
    for (name, _), a, b in zip(ref.named_parameters(), results[1], results[0]):
        assert a.abs().sum() > 0, name
        assert rel_err(a, b) <= 1e-10, name


@requires_kernels
@pytest.mark.parametrize("layer", list(LAYERS))
def test_initial_state_alone_requires_grad(layer):
    """Frozen weights, a constant input and a linear loss (a constant incoming gradient): the
    second derivative in h0 comes through the kernels' Function from the saved h0 alone, as on
    the reference path; a plain backward keeps no graph on the gradients."""
    dev = kernel_device()
    _, our_cls, extra = LAYERS[layer]
    models = [our_cls(I, H, backend=b, dtype=torch.float64, **extra).to(dev) for b in ("triton", "reference")]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64, device=dev)
    h0 = torch.randn(1, B, extra.get("proj_size") or H, dtype=torch.float64, device=dev)
    c0 = torch.randn(1, B, H, dtype=torch.float64, device=dev)
    second = []
    for m in models:
        m.requires_grad_(False)
        hi = h0.clone().requires_grad_()
        g, = torch.autograd.grad(m(x, (hi, c0) if layer.startswith("lstm") else hi)[0].sum(), hi,
                                 create_graph=True)
        second.append(torch.autograd.grad(g.pow(2).sum(), hi)[0])
    assert second[1].abs().sum() > 0
    assert rel_err(second[0], second[1]) <= 1e-10
    m = models[0].requires_grad_(True)
    m(x)[0].sum().backward()
    assert not m.weight_hh_l0.grad.requires_grad
