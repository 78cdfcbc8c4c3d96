"""PyTorch's own tests of nn.RNN / nn.LSTM / the cells, rewritten against fused_rnn's layers on
every backend ("triton" with tiny sizes: it runs under the interpreter here).

Sources: pytorch/pytorch test/test_nn.py (TestNN, TestNNDeviceType; read at commit 74f2fa66) and
the RNN entries of torch/testing/_internal/common_modules.py (module_inputs_* / module_error_inputs_*
of nn.RNN, nn.LSTM, nn.GRU and their cells, as installed). Each check keeps torch's tolerance
(assertEqual's defaults where the test gives none); "cuDNN" / "CUDA" in a name marks the fast path,
which here is the backend under test. TORCH_TESTS lists every torch test considered.
"""
import copy
import io
import itertools
import re

import pytest
import torch
import torch.nn.utils.rnn as rnn_utils
from torch import nn
from torch.testing import assert_close

import fused_rnn
from conftest import requires_kernels
from fused_rnn import _backend

TORCH_TESTS = {  # torch's test -> the test here that checks what it checks, or "n/a: why"
    # test_nn.py, TestNN
    **dict.fromkeys(["test_RNN_cell", "test_LSTM_cell"], "test_cell_smoke"),
    "test_RNN_cell_forward_zero_hidden_size": "test_rnn_cell_zero_hidden_size",
    **dict.fromkeys(["test_RNN_cell_no_broadcasting", "test_LSTM_cell_forward_input_size",
                     "test_LSTM_cell_forward_hidden_size"], "test_cell_no_broadcasting"),
    "test_pack_sequence_batch_sizes_throw": "n/a: CUDA only, and PackedSequence's own check (no module runs)",
    "test_cudnn_rnn_dropout_states_device": "n/a: cuDNN's dropout state on a second GPU",
    "test_cudnn_forward_exception": "test_forward_exception",
    "test_cudnn_weight_format": "n/a: cuDNN's flat weight buffer and its warning; fused_rnn keeps no flat buffer",
    "test_cudnn_weight_tying": "test_weight_tying",
    **dict.fromkeys(["test_rnn_args_check", "test_projections_lstm_args_check"], "test_rnn_args_check"),
    # a second GPU: the meta device stands in for it
    **dict.fromkeys(["test_rnn_check_device", "test_projections_lstm_check_device"], "test_check_device"),
    **dict.fromkeys(["test_rnn_initial_hidden_state", "test_projections_lstm_initial_hidden_state"],
                    "test_initial_hidden_state"),
    "test_projections_errors_on_gru_and_rnn": "test_projections_errors_on_rnn",
    **dict.fromkeys(["test_RNN_cpu_vs_cudnn_no_dropout", "test_RNN_cpu_vs_cudnn_with_dropout"], "test_cpu_vs_cudnn"),
    "test_RNN_cudnn_weight_norm": "test_weight_norm",
    "test_partial_flat_weights": "test_partial_flat_weights",
    "test_RNN_dropout": "test_rnn_dropout",
    "test_error_RNN_seq_len_zero": "test_seq_len_zero",
    "test_RNN_input_size_zero": "test_input_size_zero",
    "test_RNN_dropout_state": "test_rnn_dropout_state",
    "test_RNN_change_dropout": "test_rnn_change_dropout",
    # test_nn.py, TestNNDeviceType
    "test_rnn_retain_variables": "test_rnn_retain_variables",
    "test_lstmcell_backward_only_one_output_grad": "test_lstmcell_backward_only_one_output_grad",
    **dict.fromkeys(["test_LSTM_grad_and_gradgrad", "test_GRU_grad_and_gradgrad"], "test_grad_and_gradgrad"),
    "test_LSTM_differentiable_backward_using_oneDNN": "n/a: compares torch's CPU LSTM with oneDNN on and off",
    "test_save_lstm_compatibility": "test_save_lstm_compatibility",
    "test_variable_sequence": "test_variable_sequence",
    # common_modules.py: the ModuleInfo entries of nn.RNN, LSTM, RNNCell, LSTMCell, as TestModule uses them
    "module_inputs_func (TestModule.test_forward, test_factory_kwargs, test_repr)": "test_module_info_no_batch_dim",
    "module_error_inputs_func (TestModule.test_errors)": "test_module_info_errors",
    "TestModule.test_grad / test_gradgrad": "test_module_info_grad",
    "TestModule.test_non_contiguous_tensors": "test_cpu_vs_cudnn",  # its non-contiguous rows
    "TestModule.test_pickle / test_save_load": "test_rnn_dropout_state",  # torch.save / load of the module
    "ModuleInfo(nn.GRU), ModuleInfo(nn.GRUCell)": "test_module_info_no_batch_dim",  # and _errors, _grad
    "TestModule.test_cpu_gpu_parity / test_multiple_device_transfer": "n/a: need CUDA (parity: test_cpu_vs_cudnn)",
    "TestModule.test_memory_format": "n/a: channels_last layouts of convolution inputs; RNN inputs have none",
    "TestModule.test_if_train_and_eval_modes_differ": "n/a: checks ModuleInfo's train_and_eval_differ flag itself",
}

BACKENDS = ["reference", pytest.param("triton", marks=requires_kernels)]
F64 = torch.float64
# Whether the kernels' backward is differentiable (it takes the reference path's under
# create_graph=True); without, it raises like cuDNN's, which torch's tests then expect.
TRITON_GRADGRAD = hasattr(_backend, "double_backward_via")


def _pair(name, *args, backend, dtype=torch.float32, **kw):
    """torch.nn's module ``name`` and fused_rnn's twin with the same weights."""
    ref = getattr(nn, name)(*args, **kw).to(dtype)
    ours = getattr(fused_rnn, name)(*args, **kw, backend=backend).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _cover(n):
    """Rows of n booleans in which every flag takes both values: 4 rows instead of 2**n (the
    triton backend's share of a full product)."""
    alt = [bool(i % 2) for i in range(n)]
    return [tuple([False] * n), tuple([True] * n), tuple(alt), tuple(not a for a in alt)]


def _noncontig(t):
    return torch.stack([torch.zeros_like(t), t], -1)[..., 1]


def _raises_like(torch_call, our_call, exc, pattern=None):
    """torch.nn and fused_rnn both raise ``exc`` on the same bad input, messages matching
    ``pattern`` (when given)."""
    with pytest.raises(exc, match=pattern):
        torch_call()
    with pytest.raises(exc, match=pattern):
        our_call()


def test_torch_test_list_is_honest():
    """Every torch test marked applicable names a test of this file."""
    here = globals()
    for name, port in TORCH_TESTS.items():
        assert port.startswith("n/a: ") or callable(here.get(port)), (name, port)


# ------------------------------------------------------------------ TestNN: cells
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_smoke(name, backend):
    """test_RNN_cell / test_LSTM_cell: six steps and a backward, with and without bias (here
    also compared with torch.nn's cell)."""
    for bias in (True, False):
        ref, ours = _pair(name, 10, 20, bias=bias, backend=backend)
        x, h, c = torch.randn(3, 10), torch.randn(3, 20), torch.randn(3, 20)
        results = []
        for m in (ref, ours):
            hx = h if name != "LSTMCell" else (h, c)
            for _ in range(6):
                hx = m(x, hx)
            (hx if name != "LSTMCell" else hx[0] + hx[1]).sum().backward()
            results.append((hx, [p.grad for p in m.parameters()]))
        assert_close(results[1], results[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_cell_zero_hidden_size(backend):
    for nonlinearity in ("relu", "tanh"):
        cell = fused_rnn.RNNCell(10, 0, nonlinearity=nonlinearity, backend=backend)
        assert cell(torch.randn(3, 10), torch.randn(3, 0)).shape == (3, 0)
    assert fused_rnn.GRUCell(10, 0, backend=backend)(torch.randn(3, 10), torch.randn(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_no_broadcasting(backend):
    """A batch or hidden size of 1 where 3 or 20 is expected raises RuntimeError, never
    broadcasts (test_RNN_cell_no_broadcasting, test_LSTM_cell_forward_*_size)."""
    good_hx, x = torch.randn(3, 20), torch.randn(3, 10)
    cases = [(x, torch.randn(1, 20)), (x, torch.randn(3, 1)), (torch.randn(3, 1), good_hx),
             (torch.randn(3, 11), good_hx), (x, torch.randn(3, 21))]
    for inp, bad in cases:
        for name, hx in [("RNNCell", bad), ("LSTMCell", (bad, good_hx)), ("LSTMCell", (good_hx, bad))]:
            ref, ours = _pair(name, 10, 20, backend=backend)
            _raises_like(lambda: ref(inp, hx), lambda: ours(inp, hx), RuntimeError)


# ------------------------------------------------------------------ TestNN: argument checks
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_exception(backend):
    rnns = [("LSTM", {}, True), ("LSTM", {"proj_size": 10}, True), ("RNN", {}, False)]
    for name, kw, lstm in rnns:
        m = getattr(fused_rnn, name)(10, 20, batch_first=True, backend=backend, **kw)
        hidden = (torch.zeros(1, 2, 19), torch.zeros(1, 2, 19)) if lstm else torch.zeros(1, 2, 19)
        with pytest.raises(RuntimeError, match="Expected hidden.*size.*got"):
            m(torch.randn(2, 3, 10), hidden)
        with pytest.raises(RuntimeError, match=re.escape("input.size(-1) must be equal to input_size")):
            m(torch.randn(2, 3, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,P", [("RNN", 0), ("LSTM", 0), ("LSTM", 2)], ids=["RNN", "LSTM", "LSTM-proj"])
def test_rnn_args_check(mode, P, backend):
    """A wrong input batch or size, or any dim of h_0 and / or c_0 wrong (h_0 as wide as c_0 with
    projections): RuntimeError (test_rnn_args_check, test_projections_lstm_args_check)."""
    I, H, L, B, T = 3, 5, 2, 4, 6
    model = getattr(fused_rnn, mode)(I, H, L, backend=backend, **({"proj_size": P} if P else {}))
    gh, gc = (L, B, P or H), (L, B, H)
    bad = lambda s, d: tuple(7 if i == d else n for i, n in enumerate(s))  # noqa: E731
    states = [(gh, gc)] * 2 + [(bad(gh, d), gc) for d in range(3)]
    if mode == "LSTM":
        states += [(gh, bad(gc, d)) for d in range(3)] + [(bad(gh, d), bad(gc, d)) for d in range(3)]
        states += [((L, B, H), gc)] if P else []
    inputs = [(T, 7, I), (T, B, 7)] + [(T, B, I)] * (len(states) - 2)
    for xs, (hs, cs) in zip(inputs, states):
        hidden = (torch.randn(hs), torch.randn(cs)) if mode == "LSTM" else torch.randn(hs)
        with pytest.raises(RuntimeError):
            model(torch.randn(xs), hidden)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,kw", [("RNN", {}), ("LSTM", {}), ("LSTM", {"proj_size": 2})],
                         ids=["RNN", "LSTM", "LSTM-proj"])
def test_check_device(mode, kw, backend):
    """Input and parameters, input and hidden states on different devices: RuntimeError naming
    them (the meta device stands in for torch's second GPU)."""
    I, H, L, B, T = 3, 5, 2, 4, 6
    P = kw.get("proj_size") or H
    model = getattr(fused_rnn, mode)(I, H, L, backend=backend, **kw)
    on_meta = copy.deepcopy(model).to("meta")
    x, h, c = torch.randn(T, B, I), torch.randn(L, B, P), torch.randn(L, B, H)
    meta = torch.device("meta")
    for m, inp in [(model, x.to(meta)), (on_meta, x)]:
        with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device"):
            m(inp)
    hiddens = [h.to(meta)] if mode == "RNN" else [(h.to(meta), c.to(meta)), (h, c.to(meta))]
    for hidden in hiddens:
        with pytest.raises(RuntimeError, match="Input and hidden tensors are not at the same device"):
            model(x, hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_projections_errors_on_rnn(backend):
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM, not RNN or GRU"):
        fused_rnn.RNN(30, 20, 2, proj_size=10, backend=backend)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM, not RNN or GRU"):
        fused_rnn.GRU(30, 20, 2, proj_size=10, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_len_zero(backend):
    for name in ("RNN", "LSTM"):
        for bidirectional in (True, False):
            m = getattr(fused_rnn, name)(5, 6, bidirectional=bidirectional, backend=backend)
            with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
                m(torch.ones(0, 10, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_size_zero(backend):
    """A batch of 0 sequences (torch names it input_size zero): output [5, 0, 4], backward runs."""
    for name in ("RNN", "LSTM"):
        out = getattr(fused_rnn, name)(input_size=3, hidden_size=4, backend=backend)(torch.zeros(5, 0, 3))
        assert out[0].shape == (5, 0, 4)
        out[0].sum().backward()


# ------------------------------------------------------------------ TestNN: forward and backward
@pytest.mark.parametrize("backend", BACKENDS)
def test_initial_hidden_state(backend):
    """Zero initial states give what no initial state gives (RNN, LSTM, LSTM with projections)."""
    I, H, P, T, B = (30, 20, 10, 10, 32) if backend == "reference" else (5, 4, 2, 3, 2)
    cases = [("RNN", {}, False), ("LSTM", {}, False), ("LSTM", {"proj_size": P}, False),
             ("LSTM", {"proj_size": P}, True)]
    for name, kw, bidir in cases:
        rnn = getattr(fused_rnn, name)(I, H, 2, bidirectional=bidir, backend=backend, **kw)
        D = 2 if bidir else 1
        h = torch.zeros(2 * D, B, kw.get("proj_size") or H)
        hidden = (h, torch.zeros(2 * D, B, H)) if name == "LSTM" else h
        x = torch.randn(T, B, I)
        assert_close(rnn(x, hidden), rnn(x))


def _run_cudnn_case(rnn, x, hx, grad_out, grad_hy, grad_cy):
    """One module's outputs and gradients, as _test_RNN_cpu_vs_cudnn's forward_backward."""
    if isinstance(x, rnn_utils.PackedSequence):
        leaf = x.data.detach().clone().requires_grad_()
        inp = rnn_utils.PackedSequence(leaf, x.batch_sizes)
    else:
        leaf = inp = x.detach().clone().requires_grad_()
    hx = tuple(t.detach().clone().requires_grad_() for t in hx)
    output, hy = rnn(inp, hx if len(hx) == 2 else hx[0])
    output = output.data if isinstance(output, rnn_utils.PackedSequence) else output
    hy = hy if isinstance(hy, tuple) else (hy,)
    torch.autograd.backward([output, *hy], [grad_out, grad_hy, grad_cy][:1 + len(hy)])
    res = {"output": output, "hy": hy[0], "grad_input": leaf.grad, "grad_hx": hx[0].grad}
    if len(hy) == 2:
        res.update(cy=hy[1], grad_cx=hx[1].grad)
    res.update({n: p.grad for n, p in rnn.named_parameters()})
    return res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0, 1], ids=["no_dropout", "with_dropout"])
@pytest.mark.parametrize("module", ["RNN", "LSTM", "LSTM_proj", "RNN_nonlinearity", "GRU"])
def test_cpu_vs_cudnn(module, dropout, backend):
    """_test_RNN_cpu_vs_cudnn: outputs, final states and every gradient of the backend against
    torch.nn on the CPU, fp64, atol 5e-5, rtol 0, over bias, bidirectional, batch_first,
    contiguous inputs, variable lengths (packed), lengths as a tensor."""
    I, H, P, L, T, B = 10, 6, 3, 2, 7, 6
    if module == "RNN_nonlinearity":  # torch's extra loop: one direction, no bias, tanh and relu
        rows = [(False, False, False, True, False, False, nl) for nl in ("tanh", "relu")]
    else:
        # torch's 64 rows; here bias x bidirectional x batch_first x packed, with contiguity and
        # lengths-as-a-tensor varied along (each flag takes both values): 16 rows, 4 on triton
        flags = [(b, d, f, b == d, v, f) for b, d, f, v in itertools.product((True, False), repeat=4)]
        rows = [f + ("tanh",) for f in (flags if backend == "reference" else _cover(6))]
    name, Pw = ("LSTM", P) if module == "LSTM_proj" else (module.split("_")[0], H)
    for bias, bidir, batch_first, contig, variable_len, lens_as_tensor, nl in rows:
        D = 2 if bidir else 1
        kw = dict(bias=bias, dropout=dropout, bidirectional=bidir, batch_first=batch_first)
        if module == "LSTM_proj":
            kw["proj_size"] = P
        if name == "RNN":
            kw["nonlinearity"] = nl
        ref, ours = _pair(name, I, H, L, backend=backend, dtype=F64, **kw)
        x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=F64)
        grad_out = torch.randn(*x.shape[:2], Pw * D, dtype=F64)
        hx = torch.randn(L * D, B, Pw, dtype=F64)
        grad_hy = torch.randn(L * D, B, Pw, dtype=F64)
        cx = torch.randn(L * D, B, H, dtype=F64) if module == "LSTM_proj" else hx
        grad_cy = torch.randn(L * D, B, H, dtype=F64) if module == "LSTM_proj" else grad_hy
        if not contig:
            x, grad_out, hx, grad_hy, cx, grad_cy = map(_noncontig, (x, grad_out, hx, grad_hy, cx, grad_cy))
        if variable_len:
            lengths = [7, 5, 5, 2, 1, 1]
            lengths = torch.tensor(lengths) if lens_as_tensor else lengths
            x = rnn_utils.pack_padded_sequence(x, lengths, batch_first=batch_first)
            grad_out = rnn_utils.pack_padded_sequence(grad_out, lengths, batch_first=batch_first).data
        states = (hx, cx + 1) if name == "LSTM" else (hx,)
        want = _run_cudnn_case(ref, x, states, grad_out, grad_hy, grad_cy + 1)
        got = _run_cudnn_case(ours, x, states, grad_out, grad_hy, grad_cy + 1)
        assert list(got) == list(want)
        for key in want:
            assert_close(got[key], want[key], atol=5e-5, rtol=0, msg=key)


@pytest.mark.filterwarnings("ignore:.*weight_norm")
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_norm(backend):
    """test_RNN_cudnn_weight_norm: weight norm on weight_hh_l0 (and on weight_hr_l0 with
    projections) leaves the output unchanged, and so does removing it."""
    for kw, name in [({}, "weight_hh_l0"), ({"proj_size": 3}, "weight_hr_l0")]:
        m = fused_rnn.LSTM(10, 6, 2, backend=backend, **kw)
        x = torch.randn(7, 6, 10)
        expected = m(x)
        m = torch.nn.utils.weight_norm(m, name=name)
        assert_close(m(x), expected)
        m = torch.nn.utils.remove_weight_norm(m, name=name)
        assert_close(m(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_flat_weights(backend):
    """Moved while a weight is deleted (to CUDA in torch's test; here to the CPU), then given it
    back, the module still gives its output."""
    m, x = fused_rnn.LSTM(10, 6, 2, backend=backend), torch.randn(3, 2, 10)
    expected, weight = m(x), m.weight_hh_l0
    del m.weight_hh_l0
    assert not hasattr(m, "weight_hh_l0")
    m.to("cpu").weight_hh_l0 = weight
    assert_close(m(x)[0], expected[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_tying(backend):
    """test_cudnn_weight_tying: a bias shared by both directions; after one SGD step the output
    matches torch.nn's (the same tying, the same step) on the CPU."""
    for name, kw in [("LSTM", {}), ("LSTM", {"proj_size": 10}), ("RNN", {})]:
        ref, ours = _pair(name, 10, 20, batch_first=True, bidirectional=True, backend=backend, **kw)
        x = torch.randn(5, 4, 10)
        h, c = torch.randn(2, 5, kw.get("proj_size", 20)), torch.randn(2, 5, 20)
        outs = []
        for m in (ref, ours):
            m.bias_ih_l0_reverse = m.bias_ih_l0
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            hx = (h, c) if name == "LSTM" else h
            m(x, hx)[0].sum().backward()
            opt.step()
            outs.append(m(x, hx))
        assert_close(outs[1], outs[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_dropout(backend):
    """test_RNN_dropout: all-ones weights, so the second layer's output shows how many first-layer
    units dropout kept: 10*H without dropout or in eval, 0 at p=1, else a multiple of 10/(1-p).
    Hidden size 1000 as torch's; 100 on triton, where the statistical 0.8..1.2 bound is left out
    (dropout is torch's own F.dropout on every backend)."""
    H = 1000 if backend == "reference" else 100
    for p, train in itertools.product((0, 0.276, 0.731, 1), (True, False)):
        rnn = fused_rnn.RNN(10, H, 2, bias=False, dropout=p, nonlinearity="relu", backend=backend).double()
        rnn.train(train)
        with torch.no_grad():
            for w in rnn.parameters():
                w.fill_(1)
        output, hy = rnn(torch.ones(1, 1, 10, dtype=F64), torch.zeros(2, 1, H, dtype=F64))
        assert output.min() == output.max()
        val = output[0, 0, 0]
        if p == 0 or not train:
            assert val == 10 * H
        elif p == 1:
            assert val == 0
        else:
            if H == 1000:
                assert 8000 < val < 12000
            denorm_mod = (val * (1 - p)) % 10
            assert min(denorm_mod, 10 - denorm_mod) < 1e-2
        assert hy[0].min() == hy[0].max() and hy[1].min() == hy[1].max()
        assert hy[0, 0, 0] == 10 and hy[1, 0, 0] == val


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_dropout_state(backend):
    """Dropout differs call to call in training; a pickled and reloaded module (after
    flatten_parameters) gives the same output without dropout or in eval."""
    for p, train in itertools.product((0, 0.1234), (True, False)):
        rnn = fused_rnn.RNN(100, 100, 2, bias=False, dropout=p, nonlinearity="relu", backend=backend)
        rnn.train(train)
        x, hx = torch.rand(1, 1, 100), torch.rand(2, 1, 100)
        output1, hy1 = rnn(x, hx)
        output2, hy2 = rnn(x, hx)
        buf = io.BytesIO()
        torch.save(rnn, buf)
        buf.seek(0)
        rnn2 = torch.load(buf, weights_only=False)
        rnn2.flatten_parameters()
        output3, hy3 = rnn2(x, hx)
        same = p == 0 or not train
        for a, b in [(output1, output2), (output1, output3), (hy1, hy2), (hy1, hy3)]:
            assert torch.equal(a, b) == same


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_change_dropout(backend):
    """Setting .dropout between calls takes effect (sizes 100; 16 on triton)."""
    n = 100 if backend == "reference" else 16
    for train in (True, False):
        rnn = fused_rnn.RNN(n, n, 2, dropout=0, nonlinearity="relu", backend=backend).double()
        rnn.train(train)
        x = torch.rand(3, 2, n, dtype=F64)
        prev_output = None
        for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
            rnn.dropout = p
            output1, hy1 = rnn(x)
            output2, hy2 = rnn(x)
            same = p == 0 or p == 1 or not train
            assert torch.equal(output1, output2) == same and torch.equal(hy1, hy2) == same
            if prev_output is not None:
                assert torch.equal(output1, prev_output) == (not train)
                assert torch.equal(output2, prev_output) == (not train)
            prev_output = output1


# ------------------------------------------------------------------ TestNNDeviceType
@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_retain_variables(backend):
    """Five backwards of one graph (retain_graph=True) give the same gradients."""
    I, H, T, B = (10, 20, 5, 6) if backend == "reference" else (4, 5, 3, 2)
    for name in ("LSTM", "RNN"):
        rnn = getattr(fused_rnn, name)(I, H, num_layers=2, backend=backend).double()
        x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
        output = rnn(x)
        output[0].sum().backward(retain_graph=True)
        grads = [x.grad.clone()] + [p.grad.clone() for p in rnn.parameters()]
        for _ in range(4):
            rnn.zero_grad()
            x.grad.zero_()
            output[0].sum().backward(retain_graph=True)
            assert_close([x.grad] + [p.grad for p in rnn.parameters()], grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstmcell_backward_only_one_output_grad(backend):
    cell = fused_rnn.LSTMCell(2, 3, backend=backend).double()
    s = torch.randn(1, 2, dtype=F64, requires_grad=True)
    for i in range(2):
        cell(s)[i].sum().backward()
        assert s.grad is not None and s.grad.abs().sum().item() != 0


def _gradgrad(f, ins, backend):
    """gradgradcheck (fast mode through the interpreted kernels); or, where the kernels' backward
    has no derivative, that differentiating it raises RuntimeError, as torch's tests assert for
    cuDNN."""
    if backend == "reference" or TRITON_GRADGRAD:
        assert torch.autograd.gradgradcheck(f, ins, check_batched_grad=False, fast_mode=backend == "triton")
    else:
        g = torch.autograd.grad(sum(o.sum() for o in f(*ins)), ins[0], create_graph=True)[0]
        with pytest.raises(RuntimeError):
            g.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_grad_and_gradgrad(name, backend):
    """gradcheck and gradgradcheck in fp64."""
    inp = torch.rand(1, 3, 4, dtype=F64, requires_grad=True)
    for bias in (True, False):
        mod = getattr(fused_rnn, name)(4, 4, bias=bias, backend=backend).double()
        f = lambda x: _flat(mod(x))  # noqa: E731
        assert torch.autograd.gradcheck(f, (inp,), check_batched_grad=False)
        _gradgrad(f, (inp,), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_lstm_compatibility(backend):
    """A PyTorch 1.7 LSTM's state (no proj_size) loads and gives the same output."""
    model = fused_rnn.LSTM(2, 3, backend=backend)
    x = torch.randn(32 if backend == "reference" else 4, 5, 2)
    expected = model(x)
    state = model.__dict__
    del state["proj_size"]
    loaded = fused_rnn.LSTM(2, 3, backend=backend)
    loaded.__setstate__(state)
    assert_close(loaded(x), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_sequence(backend):
    """A packed batch against each sequence run alone: bidirectional 2-layer LSTM, sorted or not,
    with and without initial states and projections; fp32, atol 1e-5 (parameters' gradients 2e-4)."""
    tests = [(True, [5]), (False, [5]), (True, [10, 10, 6, 2, 2, 1, 1]), (False, [10, 10, 6, 2, 2, 1, 1]),
             (False, [2, 1, 3, 2, 10, 5, 3])]
    rows = [(s, L, d, p) for s, L in tests for d in (True, False) for p in (0, 2)]
    if backend == "triton":
        rows = [(True, [5], True, 0), (True, [5], False, 2), (False, [3, 1, 2], False, 0), (False, [3, 1, 2], True, 2)]
    for enforce_sorted, lengths, use_default_hiddens, proj_size in rows:
        T, B, H = max(lengths), len(lengths), 4
        x_leaf = torch.randn(T, B, 3, requires_grad=True)
        lstm = fused_rnn.LSTM(3, H, bidirectional=True, num_layers=2, proj_size=proj_size, backend=backend)
        lstm2 = copy.deepcopy(lstm)
        hidden0 = None
        if not use_default_hiddens:
            hidden0 = (torch.randn(4, B, proj_size or H), torch.randn(4, B, H))
        seq_outs, seq_hiddens = [], []
        for i, n in enumerate(lengths):
            hid = None if hidden0 is None else tuple(t[:, i:i + 1].contiguous() for t in hidden0)
            out, hid = lstm2(x_leaf[:n, i:i + 1], hid)
            seq_outs.append(torch.cat([out, out.new_zeros(T - n, *out.shape[1:])]))
            seq_hiddens.append(hid)
        seq_out = torch.cat(seq_outs, 1)
        seq_hidden = tuple(torch.cat(h, 1) for h in zip(*seq_hiddens))
        packed = rnn_utils.pack_padded_sequence(x_leaf, lengths, enforce_sorted=enforce_sorted)
        packed_out, packed_hidden = lstm(packed, hidden0)
        unpacked, unpacked_len = rnn_utils.pad_packed_sequence(packed_out)
        assert_close(packed_hidden, seq_hidden, atol=1e-5, rtol=0)
        assert_close(unpacked, seq_out, atol=1e-5, rtol=0)
        assert unpacked_len.tolist() == lengths
        seq_out.sum().backward()
        grad_x = x_leaf.grad.clone()
        x_leaf.grad.zero_()
        unpacked.sum().backward()
        assert_close(x_leaf.grad, grad_x, atol=1e-5, rtol=0)
        for p1, p2 in zip(lstm.parameters(), lstm2.parameters()):
            assert_close(p1.grad, p2.grad, atol=2e-4, rtol=0)


# ------------------------------------------------------------------ common_modules ModuleInfo
def _module_samples(backend):
    """module_inputs_torch_nn_RNN_GRU (is_rnn) / _LSTM / _RNN_GRU_Cell / _LSTMCell: unbatched
    inputs, with and without initial states. (name, constructor kwargs, input shape, hx shapes)."""
    rnn_rows = list(itertools.product(("relu", "tanh"), (False, True), (False, True), (False, True)))
    lstm_rows = list(itertools.product((False, True), (False, True), (False, True), (0, 2)))
    if backend == "triton":
        rnn_rows = [("relu" if r[0] else "tanh",) + r[1:] for r in _cover(4)]
        lstm_rows = [r[:3] + (2 * r[3],) for r in _cover(4)]
    out = []
    for nl, b, bf, bidir in rnn_rows:
        kw = dict(num_layers=2, batch_first=bf, bias=b, bidirectional=bidir, nonlinearity=nl)
        out += [("RNN", dict(kw, input_size=2, hidden_size=2), (3, 2), None),
                ("RNN", dict(kw, input_size=2, hidden_size=3), (3, 2), [(4 if bidir else 2, 3)])]
        if nl == "tanh":  # the GRU's rows: torch's is_rnn=False, the same flags
            del kw["nonlinearity"]
            out += [("GRU", dict(kw, input_size=2, hidden_size=2), (3, 2), None),
                    ("GRU", dict(kw, input_size=2, hidden_size=3), (3, 2), [(4 if bidir else 2, 3)])]
    for b, bf, bidir, proj in lstm_rows:
        kw = dict(input_size=2, hidden_size=3, num_layers=2, proj_size=proj, batch_first=bf, bias=b,
                  bidirectional=bidir)
        n = 4 if bidir else 2
        out += [("LSTM", kw, (2, 2), None), ("LSTM", kw, (3, 2), [(n, proj or 3), (n, 3)])]
    cell = dict(input_size=5, hidden_size=10)
    out += [("RNNCell", cell, (5,), [(10,)]), ("RNNCell", dict(cell, bias=True), (5,), [(10,)]),
            ("RNNCell", dict(cell, bias=True, nonlinearity="relu"), (5,), [(10,)]),
            ("LSTMCell", cell, (5,), [(10,), (10,)]), ("LSTMCell", dict(cell, bias=True), (5,), [(10,), (10,)]),
            ("GRUCell", cell, (5,), [(10,)]), ("GRUCell", dict(cell, bias=True), (5,), [(10,)])]
    return out


def _flat(out):
    """A module's output as a flat tuple of tensors."""
    return (out,) if isinstance(out, torch.Tensor) else tuple(t for o in out for t in _flat(o))


def _call(m, x, hx):
    if hx is None:
        return m(x)
    return m(x, tuple(hx) if len(hx) == 2 else hx[0])


def _unbatched_reference(m, name, kw, x, hx):
    """no_batch_dim_reference_*: the same input as a batch of one, the batch dim squeezed out."""
    cell = name.endswith("Cell")
    bdim, sdim = (0 if cell or kw.get("batch_first") else 1), (0 if cell else 1)
    outs = _flat(_call(m, x.unsqueeze(bdim), hx and [h.unsqueeze(sdim) for h in hx]))
    return tuple(t.squeeze(sdim if i or cell else bdim) for i, t in enumerate(outs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_info_no_batch_dim(backend):
    """TestModule.test_forward on ModuleInfo's samples (fp64): an unbatched input gives what a
    batch of one gives, and torch.nn's output; the constructor takes dtype= (test_factory_kwargs)
    and repr() works."""
    for name, kw, xs, hs in _module_samples(backend):
        ref, ours = _pair(name, **kw, backend=backend, dtype=F64)
        assert all(p.dtype == F64 for p in getattr(fused_rnn, name)(**kw, dtype=F64).parameters())
        repr(ours)
        x = torch.randn(xs, dtype=F64)
        hx = None if hs is None else [torch.randn(s, dtype=F64) for s in hs]
        got = _flat(_call(ours, x, hx))
        assert_close(got, _unbatched_reference(ours, name, kw, x, hx))
        assert_close(got, _flat(_call(ref, x, hx)))


CTOR_ERRORS = [  # module_error_inputs_torch_nn_RNN_GRU (nn.LSTM's too): constructor arguments
    ((10, 0, 1), {}, ValueError, "hidden_size must be greater than zero"),
    ((10, 10, 0), {}, ValueError, "num_layers must be greater than zero"),
    ((3, 5), {"bias": 0}, TypeError, "bias should be of type bool, got: int"),
    ((3, 5), {"bias": "True"}, TypeError, "bias should be of type bool, got: str"),
    ((3, 5), {"batch_first": 1}, TypeError, "batch_first should be of type bool, got: int"),
    ((3, 5), {"batch_first": "False"}, TypeError, "batch_first should be of type bool, got: str"),
    ((3.0, 5), {}, TypeError, "input_size should be of type int, got: float"),
    (("10", 5), {}, TypeError, "input_size should be of type int, got: str"),
    ((0, 5), {}, ValueError, "input_size must be greater than zero"),
    ((-1, 5), {}, ValueError, "input_size must be greater than zero"),
    ((3, 5.0), {}, TypeError, "hidden_size should be of type int, got: float"),
]
CELL_ERRORS = [  # module_error_inputs_torch_nn_RNN_GRU_Cell / _LSTMCell: input, state shapes
    ((3, 11), (3, 20), RuntimeError, "input has inconsistent input_size: got 11 expected 10"),
    ((3, 10), (3, 21), RuntimeError, "hidden0 has inconsistent hidden_size: got 21, expected 20"),
    ((3, 10), (5, 20), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 5"),
    ((3, 10), (3, 1, 1, 20), ValueError, r"Expected (hidden|hx\[0\]) to be 1D or 2D, got 4D instead"),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_info_errors(backend):
    """TestModule.test_errors: the exception type and message torch's ModuleInfo expects, from
    torch.nn and fused_rnn alike."""
    for name in ("RNN", "LSTM", "GRU"):
        for args, kw, exc, pattern in CTOR_ERRORS:
            _raises_like(lambda: getattr(nn, name)(*args, **kw),
                         lambda: getattr(fused_rnn, name)(*args, **kw, backend=backend), exc, pattern)
        ref, ours = _pair(name, 3, 5, backend=backend)  # the forward's dtype check: fp64 input, fp32 module
        x = torch.randn(2, 4, 3, dtype=F64)
        _raises_like(lambda: ref(x), lambda: ours(x), ValueError, r"RNN input dtype .* does not match weight "
                     r"dtype .* Convert input: input\.to\(.*\), or convert model: model\.to\(.*\)")
    for name, kw in [("RNNCell", {"nonlinearity": "tanh"}), ("RNNCell", {"nonlinearity": "relu"}), ("LSTMCell", {}),
                     ("GRUCell", {})]:
        ref, ours = _pair(name, 10, 20, backend=backend, **kw)
        for xs, hs, exc, pattern in CELL_ERRORS:
            x, h = torch.randn(xs), torch.randn(hs)
            hx = h if name != "LSTMCell" else (h, h)
            _raises_like(lambda: ref(x, hx), lambda: ours(x, hx), exc, pattern)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_info_grad(backend):
    """TestModule.test_grad / test_gradgrad: gradcheck and gradgradcheck over the input, the
    initial states and the parameters, fp64 (ModuleInfo expects gradgrad to fail on cuDNN)."""
    samples = [("RNN", dict(input_size=2, hidden_size=3, num_layers=2, bidirectional=True), (3, 1, 2), [(4, 1, 3)]),
               ("LSTM", dict(input_size=2, hidden_size=3, proj_size=2), (3, 2), [(1, 2), (1, 3)]),
               ("RNNCell", dict(input_size=2, hidden_size=3), (2, 2), [(2, 3)]),
               ("LSTMCell", dict(input_size=2, hidden_size=3), (2,), [(3,), (3,)]),
               ("GRU", dict(input_size=2, hidden_size=3), (3, 2), [(1, 3)])]
    if backend == "reference":  # on triton the GRU's row runs the same sequence op
        samples.append(("GRUCell", dict(input_size=2, hidden_size=3), (2, 2), [(2, 3)]))
    for name, kw, xs, hs in samples:
        m = getattr(fused_rnn, name)(**kw, backend=backend).double()
        names = [n for n, _ in m.named_parameters()]

        def f(x, *rest):
            hx, params = rest[:len(hs)], dict(zip(names, rest[len(hs):]))
            return _flat(torch.func.functional_call(m, params, (x, tuple(hx) if len(hx) == 2 else hx[0])))

        ins = [torch.randn(s, dtype=F64, requires_grad=True) for s in [xs, *hs]]
        ins += [p.detach().clone().requires_grad_() for p in m.parameters()]
        # fast_mode (random projections, a few forwards) on triton, which the interpreter runs slowly
        assert torch.autograd.gradcheck(f, ins, check_batched_grad=False, fast_mode=backend == "triton")
        _gradgrad(f, ins, backend)
