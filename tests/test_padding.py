"""Padding past a sequence's end never reaches a result or a gradient (issue 17, section 2).

NaN or +Inf in x, or in the incoming gradient dout, at steps t >= lengths[b]: every output and
every gradient (dx, dh0, dc0, the weights, biases, projection and LayerNorm parameters) must be
finite and equal to what torch.nn gives through pack_padded_sequence, which never sees the
padding; for the layer-norm LSTM, which torch.nn lacks, to the reference backend with finite
padding. Both backends; the kernels on the step and persistent paths (and the graph path, which
is CUDA-only), and through the layers' PackedSequence input. fp64 and tiny shapes: the
interpreter is slow. bench/memcheck_cases.py's "nan-pad" cases run the 16-bit kernels so on a GPU.
"""
import functools
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from conftest import F64, kernel_device, rel_err, requires_cuda, requires_kernels
from fused_rnn import _backend, _paths, layers

T, B, I, H, P = 5, 4, 3, 7, 4
LENGTHS = [5, 2, 0, 3]  # full, partial, empty, partial
DEV = kernel_device() or torch.device("cpu")
# cell id: (LSTM?, layer norm?, projection?, nonlinearity)
CELLS = {
    "lstm": (True, False, False, None),
    "lnlstm": (True, True, False, None),
    "lstm-proj": (True, False, True, None),
    "lnlstm-proj": (True, True, True, None),
    "rnn-tanh": (False, False, False, "tanh"),
    "rnn-relu": (False, False, False, "relu"),
}
POISONS = ["x-nan", "x-inf", "dout-nan", "dout-inf"]


@pytest.fixture(autouse=True)
def _fresh(request, monkeypatch):
    if kernel_device() is not None:
        request.getfixturevalue("poison")  # an element a kernel leaves unwritten shows as NaN
    monkeypatch.setattr(_backend, "_warned", OrderedDict())
    monkeypatch.delenv(_paths.ENV_VAR, raising=False)


def _padded(L):
    """[T, B, 1] True at the steps past each sequence's end."""
    return (torch.arange(T, device=L.device).unsqueeze(1) >= L.unsqueeze(0)).unsqueeze(-1)


def make_case(cell, seed=0):
    """(ins, ups, L): ins = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, gw, gb, cw, cb] (None where
    the cell has none), ups = [dout, dh_n, dc_n] (dc_n None for the RNN), all fp64 on DEV and finite
    (random values in the padding too)."""
    lstm, ln, proj, _ = CELLS[cell]
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).to(DEV)

    G = 4 * H if lstm else H
    Hs = P if proj else H  # the width of h
    k = 1.5 / H ** 0.5
    ins = [r(T, B, I), r(B, Hs), r(B, H) if lstm else None, r(G, I, scale=k), r(G, Hs, scale=k), r(G, scale=k),
           r(G, scale=k), r(P, H, scale=k) if proj else None]
    ins += [r(G, scale=0.2, shift=1.0), r(G, scale=0.2), r(H, scale=0.2, shift=1.0), r(H, scale=0.2)] if ln \
        else [None] * 4
    ups = [r(T, B, Hs), r(B, Hs), r(B, H) if lstm else None]
    return ins, ups, torch.tensor(LENGTHS, dtype=torch.int64, device=DEV)


def poisoned(ins, ups, L, poison):
    """Copies of ins, ups with NaN or +Inf written into the padding of x or of dout."""
    where, what = poison.split("-")
    ins, ups = list(ins), list(ups)
    i, seq = (0, ins) if where == "x" else (0, ups)
    seq[i] = seq[i].masked_fill(_padded(L), float(what))
    return ins, ups


def grads_of(outs, ups, leaves):
    """The outputs (detached) and the gradients of every leaf, driven by ups (the gradient of
    each output itself: a NaN in dout reaches backward as it would from a loss)."""
    pairs = [(o, u) for o, u in zip(outs, ups) if u is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [u for _, u in pairs])
    return [o.detach() for o, _ in pairs], list(grads)


def run_ours(cell, backend, ins, ups, L):
    lstm, ln, proj, nl = CELLS[cell]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *lnp = leaves
    if lstm:
        outs = fused_rnn.lstm_sequence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, tuple(lnp) if ln else None, L, backend,
                                       w_hr)
    else:
        outs = fused_rnn.rnn_sequence(x, h0, w_ih, w_hh, b_ih, b_hh, L, nl, backend)
    return grads_of(outs, ups, [t for t in leaves if t is not None])


def run_torch_nn(cell, ins, ups, L):
    """torch.nn (fp64, CPU) through pack_padded_sequence: it never sees the padding. The empty
    sequence (pack takes none) is filled in by hand: out 0, h_n = h0, c_n = c0."""
    lstm, _, proj, nl = CELLS[cell]
    ins = [None if t is None else t.detach().cpu().clone().requires_grad_() for t in ins]
    ups = [None if u is None else u.cpu() for u in ups]
    L = L.cpu()
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = ins[:8]
    if lstm:
        mod = nn.LSTM(I, H, proj_size=P if proj else 0, dtype=F64)
    else:
        mod = nn.RNN(I, H, nonlinearity=nl, dtype=F64)
    params = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    if proj:
        params["weight_hr_l0"] = w_hr
    rows = (L > 0).nonzero().squeeze(1)
    packed = pack_padded_sequence(x[:, rows], L[rows], enforce_sorted=False)
    state = (h0[rows].unsqueeze(0), c0[rows].unsqueeze(0)) if lstm else h0[rows].unsqueeze(0)
    out_p, st = torch.func.functional_call(mod, params, (packed, state))
    out_r, _ = pad_packed_sequence(out_p, total_length=T)
    out = out_r.new_zeros(T, B, out_r.shape[-1]).index_copy(1, rows, out_r)
    if lstm:
        outs = [out, h0.index_copy(0, rows, st[0][0]), c0.index_copy(0, rows, st[1][0])]
    else:
        outs = [out, h0.index_copy(0, rows, st[0])]
    outs, grads = grads_of(outs, ups, [t for t in ins if t is not None])
    return [t.to(DEV) for t in outs], [t.to(DEV) for t in grads]


def truth(cell, ins, ups, L):
    if CELLS[cell][1]:  # layer norm: torch.nn has none; the reference with finite padding
        return run_ours(cell, "reference", ins, ups, L)
    return run_torch_nn(cell, ins, ups, L)


def names(cell, ins):
    all_names = ["dx", "dh0", "dc0", "dw_ih", "dw_hh", "db_ih", "db_hh", "dw_hr", "dgw", "dgb", "dcw", "dcb"]
    return [n for n, t in zip(all_names, ins) if t is not None]


def assert_matches(cell, ins, L, ours, ref):
    (outs, grads), (r_outs, r_grads) = ours, ref
    pad = _padded(L)
    for what, a, b in zip(["out", "h_n", "c_n"] + names(cell, ins), outs + grads, r_outs + r_grads):
        assert a.shape == b.shape, what
        assert torch.isfinite(a).all(), f"{what}: not finite where {int((~torch.isfinite(a)).sum())} elements"
        e = rel_err(a, b)
        assert e <= 1e-10, f"{what}: rel err {e:.3e}"
    assert (outs[0].masked_select(pad) == 0).all(), "out past the end"
    assert (grads[0].masked_select(pad) == 0).all(), "dx past the end"


@pytest.fixture
def spy(monkeypatch):
    """Counts the persistent loops' launches (so that a test knows they really ran)."""
    from fused_rnn.kernels import ln_lstm_persistent, lstm_persistent, rnn_persistent

    calls = {}
    for mod, fns in ((lstm_persistent, ("lstm_fwd_loop", "lstm_bwd_loop")),
                     (rnn_persistent, ("rnn_fwd_loop", "rnn_bwd_loop")),
                     (ln_lstm_persistent, ("ln_lstm_fwd_loop", "ln_lstm_bwd_loop"))):
        for fn in fns:
            def wrapped(*a, _real=getattr(mod, fn), _name=fn, **k):
                calls[_name] = calls.get(_name, 0) + 1
                return _real(*a, **k)

            monkeypatch.setattr(mod, fn, wrapped)
    return calls


def _cases():
    for cell, (_, ln, proj, _) in CELLS.items():
        for poison in POISONS:
            yield pytest.param(cell, poison, "reference", None, id=f"{cell}-{poison}-reference")
            paths = ("step", "graph") if proj else ("step", "persistent", "graph")  # no persistent proj kernel
            for path in paths:
                yield pytest.param(cell, poison, "triton", path, id=f"{cell}-{poison}-triton-{path}",
                                   marks=requires_cuda if path == "graph" else requires_kernels)


def _no_persistent_plan(cell):
    """Why the persistent kernels would not take this problem on DEV (None: they would)."""
    from fused_rnn.kernels import config, lstm as KL, rnn as KR

    lstm, ln, _, _ = CELLS[cell]
    for d in ("fwd", "bwd"):
        if lstm:
            lnp = (None,) * 4 if ln else None
            plan, why = KL.persistent_plan(d, B, H, lnp, config.default_fused(H, lnp, F64), F64, DEV)
        else:
            plan, why = KR.persistent_plan(d, B, H, True, F64, DEV)
        if plan is None:
            return why
    return None


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("cell,poison,backend,path", list(_cases()))
def test_padding_never_reaches_results(cell, poison, backend, path, request):
    ins, ups, L = make_case(cell)
    ref = truth(cell, ins, ups, L)
    bad_ins, bad_ups = poisoned(ins, ups, L, poison)
    if path is None:
        ours = run_ours(cell, backend, bad_ins, bad_ups, L)
    else:
        spy = request.getfixturevalue("spy")
        why = _no_persistent_plan(cell) if path == "persistent" and DEV.type == "cuda" else None
        if why:  # (the interpreter's single-program plans take every case)
            pytest.skip(f"no persistent plan on this GPU: {why}")
        with fused_rnn.use_path(path):
            ours = run_ours(cell, backend, bad_ins, bad_ups, L)
        if path == "persistent":  # both loops ran persistent, not a fallback
            assert sum(spy.values()) == 2 and all(v == 1 for v in spy.values()), spy
    assert_matches(cell, ins, L, ours, ref)


# ---- the layers' PackedSequence input: whatever pad_packed_sequence fills the padding with ----

LAYER_CELLS = {"lstm": (True, 0, None), "lstm-proj": (True, P, None), "rnn-tanh": (False, 0, "tanh"),
               "rnn-relu": (False, 0, "relu")}


def _layer_cases():
    for cell in LAYER_CELLS:
        for fill in ("nan", "inf"):
            yield pytest.param(cell, fill, "reference", id=f"{cell}-{fill}-reference")
            yield pytest.param(cell, fill, "triton", id=f"{cell}-{fill}-triton", marks=requires_kernels)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("cell,fill,backend", list(_layer_cases()))
def test_packed_layers_ignore_padding(cell, fill, backend, monkeypatch):
    """Two layers, bidirectional, PackedSequence in: with the layer's pad_packed_sequence padding
    with NaN / +Inf, outputs and every gradient equal torch.nn's (fp64)."""
    lstm, proj, nl = LAYER_CELLS[cell]
    kw = dict(num_layers=2, bidirectional=True, dtype=F64)
    if lstm:
        ref_mod, mod = nn.LSTM(I, H, proj_size=proj, **kw), fused_rnn.LSTM(I, H, proj_size=proj, backend=backend, **kw)
    else:
        ref_mod, mod = nn.RNN(I, H, nonlinearity=nl, **kw), fused_rnn.RNN(I, H, nonlinearity=nl, backend=backend, **kw)
    mod.load_state_dict(ref_mod.state_dict())
    mod.to(DEV)
    monkeypatch.setattr(layers, "pad_packed_sequence", functools.partial(pad_packed_sequence,
                                                                         padding_value=float(fill)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, generator=g, dtype=F64)
    lengths = torch.tensor([5, 2, 1, 3])  # pack takes no empty sequence

    def run(m, dev):
        xl = x.to(dev).requires_grad_()
        out, st = m(pack_padded_sequence(xl, lengths, enforce_sorted=False))
        outs = [out.data] + (list(st) if lstm else [st])
        g2 = torch.Generator().manual_seed(2)
        ups = [torch.randn(o.shape, generator=g2, dtype=F64).to(dev) for o in outs]
        return grads_of(outs, ups, [xl] + list(m.parameters()))

    ours, ref = run(mod, DEV), run(ref_mod, "cpu")
    for i, (a, b) in enumerate(zip(ours[0] + ours[1], ref[0] + ref[1])):
        assert torch.isfinite(a).all(), i
        assert rel_err(a.cpu(), b) <= 1e-10, i
