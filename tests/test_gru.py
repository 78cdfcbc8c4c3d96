"""The GRU: fused_rnn.GRU / GRUCell against torch.nn's (values, gradients, state_dicts, every input
form) on the reference and triton backends, and the kernels (fused_rnn.kernels.gru through
fused_rnn.gru.GRUFunction) against the fp64 reference path as tests/test_rnn.py tests the RNN's:
on a CUDA GPU or under TRITON_INTERPRET=1, launcher buffers NaN-poisoned."""
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from conftest import (
    BF16, DT_NAME, F16, F32, F64, INTERPRET, assert_deterministic, assert_matches_reference, fwd_bwd, kernel_device,
    rel_err, requires_cuda, requires_kernels, STEP_SHAPES, tol,
)
from fused_rnn import _backend
from fused_rnn.gru import GRUFunction, gru_sequence
from fused_rnn.kernels import config
from fused_rnn.reference import gru_sequence_ref

DEV = kernel_device()
T, B, I, H = 5, 3, 7, 10
# the interpreter lane runs the kernels only (lane 1 runs the reference backend)
BACKENDS = ([] if INTERPRET else ["reference"]) + (["triton"] if DEV is not None else [])
NAMES = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
OUT_NAMES = ["out", "h_n"]


def make_case(T, B, I, H, dtype, bias=True, lengths=None, seed=0, device=DEV):
    """Inputs [x, h0, w_ih, w_hh, b_ih, b_hh] in ``dtype``, lengths, upstream (dout, dh_n)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(device=device, dtype=dtype)

    k = 1.5 / H ** 0.5
    ins = [r(T, B, I), r(B, H), r(3 * H, I, scale=k), r(3 * H, H, scale=k)]
    ins += [r(3 * H, scale=k), r(3 * H, scale=k)] if bias else [None, None]
    L = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=device)
    return ins, L, (r(T, B, H), r(B, H))


def triton_gru(ins, L):
    return GRUFunction.apply(*ins, L, False)


def reference_gru(ins, L):
    return gru_sequence_ref(*ins, L)


def _device(backend):
    return "cpu" if backend == "reference" else DEV


def _pair(backend, dtype=F64, cls=fused_rnn.GRU, **kw):
    """torch.nn's layer (on the CPU) and ours on the backend's device, with the same weights."""
    torch.manual_seed(0)
    ref = getattr(nn, cls.__name__)(I, H, **kw).to(dtype)
    ours = cls(I, H, backend=backend, **kw).to(device=_device(backend), dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _outs_grads(m, args):
    """Outputs (flattened, on the CPU) and the gradients of every parameter and floating input."""
    m.zero_grad()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    for a in leaves:
        a.requires_grad_()
    out = m(*args)
    out, h = out if isinstance(out, tuple) else (out, None)
    data = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    outs = [data] + ([] if h is None else [h])
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum()
               for o in outs)
    grads = torch.autograd.grad(loss, leaves + list(m.parameters()), allow_unused=True)
    return [o.detach().cpu() for o in outs] + [None if g is None else g.cpu() for g in grads]


def _compare(ref, ours, make_args, tolerance):
    dev = next(ours.parameters()).device
    a = _outs_grads(ref, make_args("cpu"))
    b = _outs_grads(ours, make_args(dev))
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            assert x is None and (y is None or not y.any()), i
            continue
        assert x.shape == y.shape, i
        assert rel_err(y, x) <= tolerance, (i, rel_err(y, x))


LAYER_CASES = {
    "2layer-bidir-h0": (dict(num_layers=2, bidirectional=True), "h0"),
    "batch_first-nobias": (dict(batch_first=True, bias=False), None),
    "packed-bidir": (dict(bidirectional=True), "packed"),
    "unbatched-h0": (dict(), "unbatched"),
    "batch0": (dict(num_layers=2), "batch0"),
}


@pytest.mark.filterwarnings("ignore:fused_rnn. the GRU kernels cannot take an empty problem")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAYER_CASES)
def test_gru_layer_matches_torch_nn(case, backend):
    kw, form = LAYER_CASES[case]
    ref, ours = _pair(backend, **kw)
    g = torch.Generator().manual_seed(1)
    D, L = 2 if ours.bidirectional else 1, ours.num_layers
    x = torch.randn(T, B, I, generator=g, dtype=F64)
    h0 = torch.randn(L * D, B, H, generator=g, dtype=F64)

    def make_args(dev):
        if form == "packed":
            return (pack_padded_sequence(x.to(dev), [2, T, 4], enforce_sorted=False), h0.to(dev))
        if form == "unbatched":
            return (x[:, 0].to(dev), h0[:, 0].to(dev))
        if form == "batch0":
            return (x[:, :0].to(dev),)
        xx = x.transpose(0, 1) if ours.batch_first else x
        return (xx.to(dev),) + ((h0.to(dev),) if form == "h0" else ())

    _compare(ref, ours, make_args, tol(F64))


def test_gru_packed_output_is_zero_past_the_ends_and_dropout_trains():
    """The packed output padded back has zeros past each length; with dropout in training the layer
    runs and is reproducible from the seed (torch's dropout between layers)."""
    _, ours = _pair("reference", num_layers=2, dropout=0.5)
    x = torch.randn(T, B, I, dtype=F64)
    out, _ = ours(pack_padded_sequence(x, [T, 3, 1], enforce_sorted=False))
    padded, _ = pad_packed_sequence(out)
    assert (padded[3:, 1] == 0).all() and (padded[1:, 2] == 0).all()
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(ours(x)[0])
    assert torch.equal(*runs)
    assert not torch.equal(runs[0], ours.eval()(x)[0])


def test_gru_state_dict_round_trips_with_torch_nn():
    ref = nn.GRU(I, H, num_layers=2, bidirectional=True)
    ours = fused_rnn.GRU(I, H, num_layers=2, bidirectional=True)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    ours.load_state_dict(ref.state_dict())
    ref2 = nn.GRU(I, H, num_layers=2, bidirectional=True)
    ref2.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref2.state_dict().values(), ref.state_dict().values()))
    twin = fused_rnn.to_torch(ours)
    assert type(twin) is nn.GRU and type(fused_rnn.to_torch(fused_rnn.GRUCell(I, H))) is nn.GRUCell
    assert isinstance(fused_rnn.GRUCell(I, H), nn.GRUCell) and isinstance(ours, nn.RNNBase)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        fused_rnn.GRU(I, H, proj_size=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["batched", "unbatched", "no-hx"])
def test_gru_cell_matches_torch_nn(form, backend):
    ref, ours = _pair(backend, cls=fused_rnn.GRUCell)
    x, h = torch.randn(B, I, dtype=F64), torch.randn(B, H, dtype=F64)

    def make_args(dev):
        if form == "unbatched":
            return (x[0].to(dev), h[0].to(dev))
        return (x.to(dev),) + ((h.to(dev),) if form == "batched" else ())

    _compare(ref, ours, make_args, tol(F64))


def test_gru_bad_input_same_on_every_backend():
    """The shared validation, before any backend runs: the same errors everywhere."""
    x, h0 = torch.randn(T, B, I), torch.randn(B, H)
    w_ih, w_hh = torch.randn(3 * H, I), torch.randn(3 * H, H)
    for backend in ("reference", "auto", "triton"):
        with pytest.raises(ValueError, match=re.escape("w_ih must be [3H, I] with I=7")):
            gru_sequence(x, h0, w_ih[:, :5], w_hh, backend=backend)
        with pytest.raises(ValueError, match=re.escape("w_hh must have shape (30, 10)")):
            gru_sequence(x, h0, w_ih, w_hh[:, :4], backend=backend)
        with pytest.raises(ValueError, match=re.escape("h0 must have shape (3, 10)")):
            gru_sequence(x, h0[:2], w_ih, w_hh, backend=backend)
        with pytest.raises(ValueError, match=re.escape("lengths must lie in [0, T=5]")):
            gru_sequence(x, h0, w_ih, w_hh, lengths=[6, 1, 1], backend=backend)
    cell, ref = fused_rnn.GRUCell(I, H), nn.GRUCell(I, H)
    for m in (cell, ref):
        with pytest.raises(ValueError, match="GRUCell: Expected input to be 1D or 2D, got 3D instead"):
            m(x)
        with pytest.raises(ValueError, match="GRUCell: Expected hidden to be 1D or 2D, got 3D instead"):
            m(x[0], h0[None])


# ---------------------------------------------------------------------------------- the kernels

SHAPES = list(STEP_SHAPES)  # (id, T, B, I, H, lengths, bias)
DTYPES = [F64, F32, F16, BF16] if DEV is not None and DEV.type == "cuda" else [F64, F32]


def _kernel_cases():
    for sid, T_, B_, I_, H_, lengths, bias in SHAPES:
        for dtype in DTYPES:
            yield pytest.param(T_, B_, I_, H_, lengths, bias, dtype, id=f"{sid}-{DT_NAME[dtype]}")
    if DEV is not None and DEV.type == "cpu":  # half precisions through the interpreter: one shape
        for dtype in (F16, BF16):
            yield pytest.param(5, 3, 7, 10, [5, 2, 0], True, dtype, id=f"B3-T5-H10-len-{DT_NAME[dtype]}")


@requires_kernels
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("T,B,I,H,lengths,bias,dtype", list(_kernel_cases()))
def test_gru_kernels_match_reference(T, B, I, H, lengths, bias, dtype):
    ins, L, ups = make_case(T, B, I, H, dtype, bias, lengths)
    assert_matches_reference(triton_gru, reference_gru, ins, L, ups, NAMES, OUT_NAMES)


@requires_kernels
def test_gru_gradcheck():
    """fp64 gradcheck of the hand-written backward for x, h0, every weight and bias, with
    variable lengths (a finished sequence, so the pass-through is covered)."""
    ins, L, _ = make_case(2, 2, 2, 3, F64, True, [2, 1])
    leaves = [t.detach().requires_grad_() for t in ins]
    assert torch.autograd.gradcheck(lambda *a: triton_gru(list(a), L), leaves)


@requires_kernels
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_NAME.get)
def test_gru_step_tiles(dtype):
    """The kernels at the 64-row, 16-unit tile the launchers take at large batches (forced through
    options().step_tiles at B70 H20: partial row and unit blocks), against the reference; and the
    rule that picks tiles (kernels.tiles.gru_blocks)."""
    from fused_rnn.kernels.tiles import gru_blocks

    assert gru_blocks(256, 1024, "fwd", BF16) == (64, 32, 32, 8)
    assert gru_blocks(16, 256, "bwd", BF16)[2] == 32 and gru_blocks(5, 7, "fwd", F64) == (16, 16, 8, 4)
    ins, L, ups = make_case(3, 70, 6, 20, dtype, True, [3 - b % 4 for b in range(70)])
    with config.using(step_tiles=dict(BLOCK_B=64, BLOCK_H=16, num_warps=8)):
        outs, grads = fwd_bwd(triton_gru, ins, L, ups)
    r_outs, r_grads = fwd_bwd(reference_gru, ins, L, ups, dtype=F64)
    for a, b in zip(outs + grads, r_outs + r_grads):
        assert rel_err(a, b) <= tol(dtype)


@requires_kernels
def test_gru_deterministic_and_sequence_dispatch():
    """Two identical calls: bitwise-identical outputs and gradients; gru_sequence(backend="triton")
    takes the kernels; a "persistent" request runs the step loop with a warning."""
    ins, L, ups = make_case(3, 17, 4, 20, F32, True, [3, 1, 2] * 5 + [0, 3])
    assert_deterministic(triton_gru, ins, L, ups)
    ours = gru_sequence(*ins, L, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(ours, triton_gru(ins, L)))
    with pytest.warns(RuntimeWarning, match="persistent path not possible for gru_fwd .the GRU has no persistent"):
        with fused_rnn.use_path("persistent"):
            again = gru_sequence(*ins, L, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(ours, again))


@requires_kernels
def test_gru_empty_sequence_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    ins, _, _ = make_case(1, 2, 3, 5, F32)
    x, h0, *w = ins
    with pytest.warns(RuntimeWarning, match="GRU kernels cannot take an empty problem"):
        out, h_n = gru_sequence(x[:0], h0, *w, backend="triton")
    assert out.shape == (0, 2, 5) and torch.equal(h_n, h0)


@requires_kernels
def test_gru_double_backward_and_autocast():
    """create_graph=True takes the reference path's differentiable backward (same gradients as the
    kernels' and a second derivative); under autocast (bf16) the layer runs its kernels in bf16."""
    ins, L, ups = make_case(3, 2, 3, 5, F64, True, [3, 2])
    for fn in (triton_gru, reference_gru):
        leaves = [t.detach().requires_grad_() for t in ins]
        out, h_n = fn(leaves, L)
        g = torch.autograd.grad((out * ups[0]).sum() + (h_n * ups[1]).sum(), leaves, create_graph=True)
        gg = torch.autograd.grad(sum((t ** 2).sum() for t in g), leaves[2])[0]
        if fn is triton_gru:
            first = (g, gg)
    assert all(rel_err(a, b) <= tol(F64) for a, b in zip(first[0] + (first[1],), g + (gg,)))
    _, ours = _pair("triton", F32)
    x = torch.randn(T, B, I, device=DEV)
    with torch.autocast(DEV.type, dtype=BF16):
        out, h = ours(x)
    assert out.dtype == BF16 and h.dtype == BF16
    assert rel_err(out, ours(x)[0]) <= 2e-2


@requires_kernels
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_NAME.get)
def test_gru_custom_ops_opcheck(dtype):
    """opcheck: the custom ops' schemas, fake implementations, registrations and aot_dispatch."""
    ins, L, ups = make_case(2, 3, 4, 5, dtype, True, [2, 1, 0])
    args = (*ins, L, False)
    torch.library.opcheck(torch.ops.fused_rnn.gru_fwd.default, args)
    out, h_n, hs, gates = torch.ops.fused_rnn.gru_fwd(*args)
    x, h0, w_ih, w_hh = ins[:4]
    torch.library.opcheck(torch.ops.fused_rnn.gru_bwd.default, (*ups, x, w_ih, w_hh, hs, gates, L, False, True, True))


class _Model(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.gru = fused_rnn.GRU(I, H, bidirectional=True, batch_first=True, backend=backend)
        self.cell = fused_rnn.GRUCell(2 * H, H, backend=backend)

    def forward(self, x):
        y, h = self.gru(x)
        c = None
        for t in range(y.shape[1]):
            c = self.cell(y[:, t], c)
        return c.sum() + h.sum() + y.sum()


@pytest.mark.parametrize("backend", BACKENDS[-1:])  # the kernels where they run
def test_gru_compile_fullgraph(backend):
    """torch.compile(fullgraph=True): no graph break (the custom ops' fakes on triton), and the same
    loss and gradients as eager."""
    from test_compile import _check

    _check(_Model(backend).to(_device(backend)), torch.randn(B, 2, I, device=_device(backend)), "aot_eager")


@requires_cuda
def test_gru_graph_path_matches_step():
    ins, L, ups = make_case(6, 5, 7, 40, F32, True, [6, 1, 3, 0, 6])
    step = fwd_bwd(triton_gru, ins, L, ups)
    with fused_rnn.use_path("graph"):
        for _ in range(2):  # capture, then replay
            graph = fwd_bwd(triton_gru, ins, L, ups)
            assert all(torch.equal(a, b) for a, b in zip(step[0] + step[1], graph[0] + graph[1]))


def test_gru_bench_rows_compute_the_same_gru():
    """`fused-rnn bench --cells gru`: torch.nn's row (cuDNN on CUDA) holds the problem's weights,
    so it, the reference row and (under the interpreter) the triton row compute the same
    outputs."""
    from fused_rnn.bench import cases, paths

    def problem():
        return cases.make_problem("gru", 3, 4, 8, F32, "cpu")

    with torch.no_grad():
        want = paths.functional_path("reference")(problem())()
        outs = {"nn": paths.build_nn(problem())[0]()}
        if DEV is not None and DEV.type == "cpu":
            outs["triton"] = paths.functional_path("triton")(problem())()
    assert want.shape == (4, 3, 8)
    for name, o in outs.items():
        assert rel_err(o, want) < 1e-5, name
