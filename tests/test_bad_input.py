"""Bad input gets torch.nn's exception (type and message) where torch.nn checks the same thing,
and a ValueError or TypeError naming the argument where only fused_rnn checks."""
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn
from conftest import requires_cuda, requires_kernels

B, T, I, H = 3, 7, 5, 11


@pytest.fixture(params=["lstm", "rnn", "gru"])
def pair(request):
    """fused_rnn's 2-layer layer and torch.nn's with the same weights."""
    name = request.param.upper()
    ref = getattr(nn, name)(I, H, num_layers=2)
    ours = getattr(fused_rnn, name)(I, H, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _hx(layer, shape, c_shape=None):
    """A zero initial state of ``shape`` in the form the layer takes."""
    h = torch.zeros(shape)
    lstm = isinstance(layer, (fused_rnn.LSTM, nn.LSTM, fused_rnn.LSTMCell, nn.LSTMCell))
    return (h, torch.zeros(c_shape or shape)) if lstm else h


def _like_torch(ours, ref, args, exc, key, torch_key=True):
    """torch.nn and fused_rnn both raise ``exc`` on ``args``, ours with ``key`` (a literal) in its
    message; torch's message too unless ``torch_key`` is False (where torch fails in its own op
    with words of its own)."""
    with pytest.raises(exc) as want:
        ref(*args)
    if torch_key:
        assert key in str(want.value), str(want.value)
    with pytest.raises(exc, match=re.escape(key)):
        ours(*args)


def test_wrong_rank(pair):
    ours, ref = pair
    _like_torch(ours, ref, (torch.randn(T, B, I, 1),), ValueError, "Expected input to be 2D or 3D, got 4D")
    _like_torch(ours, ref, (torch.randn(I),), ValueError, "Expected input to be 2D or 3D, got 1D")


def test_wrong_feature_size(pair):
    ours, ref = pair
    _like_torch(ours, ref, (torch.randn(T, B, I + 1),), RuntimeError,
                "input.size(-1) must be equal to input_size. Expected 5, got 6")
    packed = pack_padded_sequence(torch.randn(T, B, I + 1), [T, 2, 1])
    with pytest.raises(RuntimeError, match=re.escape("must be equal to input_size. Expected 5, got 6")):
        ours(packed)


def test_wrong_dtype(pair):
    ours, ref = pair
    _like_torch(ours.double(), ref.double(), (torch.randn(T, B, I),), ValueError,
                "RNN input dtype (torch.float32) does not match weight dtype (torch.float64). "
                "Convert input: input.to(torch.float64), or convert model: model.to(torch.float32)")
    _like_torch(ours, ref, (torch.ones(T, B, I, dtype=torch.int64),), ValueError,
                "RNN input dtype (torch.int64) does not match weight dtype (torch.float64)")
    packed = pack_padded_sequence(torch.randn(T, B, I), [T, 2, 1])
    with pytest.raises(ValueError, match=re.escape("RNN input dtype (torch.float32) does not match")):
        ours(packed)
    # fused_rnn checks every parameter, not only the first as torch does
    ours.float().weight_hh_l1.data = ours.weight_hh_l1.data.double()
    with pytest.raises(ValueError, match=r"does not match weight dtype \(torch.float64\).*weight_hh_l1"):
        ours(torch.randn(T, B, I))


def test_not_a_tensor(pair):
    """fused_rnn's own checks (torch.nn fails inside its code): TypeError naming the argument."""
    ours, _ = pair
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        ours([[0.0] * I] * T)
    if isinstance(ours, fused_rnn.LSTM):
        with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\) for an LSTM, got Tensor"):
            ours(torch.randn(T, B, I), torch.zeros(2, B, H))
        with pytest.raises(TypeError, match=r"hx\[1\] \(c_0\) must be a torch.Tensor, got NoneType"):
            ours(torch.randn(T, B, I), (torch.zeros(2, B, H), None))
    else:
        name = "a GRU" if isinstance(ours, fused_rnn.GRU) else "an RNN"
        with pytest.raises(TypeError, match=f"hx must be a tensor for {name}, got list"):
            ours(torch.randn(T, B, I), [torch.zeros(2, B, H)])


def test_lstm_needs_two_states():
    ref = nn.LSTM(I, H)
    ours = fused_rnn.LSTM(I, H)
    h = torch.zeros(1, B, H)
    _like_torch(ours, ref, (torch.randn(T, B, I), (h, h, h)), RuntimeError, "lstm expects two hidden states")
    ref, ours = nn.LSTMCell(I, H), fused_rnn.LSTMCell(I, H)
    _like_torch(ours, ref, (torch.randn(B, I), (h[0],)), RuntimeError, "lstm_cell expects two hidden states")


def test_weights_on_another_device(pair):
    ours, ref = pair
    _like_torch(ours.to("meta"), ref.to("meta"), (torch.randn(T, B, I),), RuntimeError,
                "Input and parameter tensors are not at the same device, found input tensor at cpu and "
                "parameter tensor at meta")


def test_state_on_another_device(pair):
    ours, ref = pair
    hx = torch.zeros(2, B, H, device="meta")
    hx = (torch.zeros(2, B, H), hx) if isinstance(ours, fused_rnn.LSTM) else hx
    _like_torch(ours, ref, (torch.randn(T, B, I), hx), RuntimeError,
                "Input and hidden tensors are not at the same device, found input tensor at cpu and "
                "hidden tensor at meta")


def test_state_of_wrong_shape(pair):
    ours, ref = pair
    label = "hidden[0]" if isinstance(ours, fused_rnn.LSTM) else "hidden"
    x = torch.randn(T, B, I)
    _like_torch(ours, ref, (x, _hx(ours, (1, B, H))), RuntimeError, f"Expected {label} size (2, 3, 11), got [1, 3, 11]")
    _like_torch(ours, ref, (x, _hx(ours, (2, 1, H))), RuntimeError,  # never broadcast over the batch
                f"Expected {label} size (2, 3, 11), got [2, 1, 11]")
    _like_torch(ours, ref, (x, _hx(ours, (2, B))), RuntimeError, "For batched 3-D input, hx")
    _like_torch(ours, ref, (x[:, 0], _hx(ours, (2, 1, H))), RuntimeError, "For unbatched 2-D input, hx")
    packed = pack_padded_sequence(x, [T, 2, 1])
    with pytest.raises(RuntimeError, match=re.escape(f"Expected {label} size (2, 3, 11), got [2, 2, 11]")):
        ours(packed, _hx(ours, (2, 2, H)))


def test_c0_of_wrong_shape():
    ours, ref = fused_rnn.LSTM(I, H), nn.LSTM(I, H)
    _like_torch(ours, ref, (torch.randn(T, B, I), (torch.zeros(1, B, H), torch.zeros(1, B, H + 1))), RuntimeError,
                "Expected hidden[1] size (1, 3, 11), got [1, 3, 12]")


def test_state_dtype_mismatch(pair):
    """torch's CPU op fails in its matmul (its cuDNN path checks, with the words used here)."""
    ours, ref = pair
    h0 = torch.zeros(2, B, H, dtype=torch.float64)
    hx = (h0, torch.zeros(2, B, H)) if isinstance(ours, fused_rnn.LSTM) else h0
    _like_torch(ours, ref, (torch.randn(T, B, I), hx), RuntimeError,
                "Input and hidden tensors are not the same dtype, found input tensor with torch.float32 and "
                "hidden tensor with torch.float64", torch_key=False)


def test_zero_length_sequence(pair):
    ours, ref = pair
    _like_torch(ours, ref, (torch.randn(0, B, I),), RuntimeError, "Expected sequence length to be larger than 0 in RNN")


def test_cells_bad_input():
    ours, ref = fused_rnn.LSTMCell(I, H), nn.LSTMCell(I, H)
    x = torch.randn(B, I)
    _like_torch(ours, ref, (torch.randn(B, I + 2),), RuntimeError, "input has inconsistent input_size: got 7 expected 5")
    _like_torch(ours, ref, (torch.randn(T, B, I),), ValueError, "LSTMCell: Expected input to be 1D or 2D, got 3D instead")
    _like_torch(ours, ref, (x, _hx(ours, (1, H))), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 1")
    _like_torch(ours, ref, (x, _hx(ours, (B, H), (B, H + 1))), RuntimeError,
                "hidden1 has inconsistent hidden_size: got 12, expected 11")
    _like_torch(ours, ref, (x, _hx(ours, (B, 1, H))), ValueError, "LSTMCell: Expected hx[0] to be 1D or 2D, got 3D")
    # an unbatched input with a batched state: torch's check sees hidden_size B; fused_rnn also names the shape
    _like_torch(ours, ref, (x[0], _hx(ours, (1, H))), RuntimeError, "hidden0 has inconsistent hidden_size: got 1")
    with pytest.raises(RuntimeError, match=re.escape("hx[0] (h_0) must have shape (11,), got (11, 11)")):
        ours(x[0], _hx(ours, (H, H)))  # passes torch's checks, then broadcasts in torch's op
    rours, rref = fused_rnn.RNNCell(I, H).double(), nn.RNNCell(I, H).double()
    _like_torch(rours, rref, (x,), RuntimeError, "input and parameter weight_ih must have the same dtype",
                torch_key=False)
    _like_torch(rours, rref, (x.double(), torch.zeros(B, H)), RuntimeError, "must have the same dtype", torch_key=False)
    _like_torch(rours, rref, (x.double(), torch.zeros(1, B, 1, H, dtype=torch.float64)), ValueError,
                "RNNCell: Expected hidden to be 1D or 2D, got 4D instead")


def test_bad_nonlinearity():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        fused_rnn.RNN(I, H, nonlinearity="gelu")
    ours, ref = fused_rnn.RNNCell(I, H, nonlinearity="gelu"), nn.RNNCell(I, H, nonlinearity="gelu")
    _like_torch(ours, ref, (torch.randn(B, I),), RuntimeError, "Unknown nonlinearity: gelu")


# ------------------------------------------------ the functional entry points (no layer checks)
def _lstm_args(P=None):
    """Well-shaped lstm_sequence arguments (B 3, I 5, H 11; h P wide with a projection)."""
    Pw = P or H
    args = dict(x=torch.randn(T, B, I), h0=torch.zeros(B, Pw), c0=torch.zeros(B, H),
                w_ih=torch.randn(4 * H, I), w_hh=torch.randn(4 * H, Pw), b_ih=torch.randn(4 * H),
                b_hh=torch.randn(4 * H), ln=(torch.ones(4 * H), torch.zeros(4 * H), torch.ones(H), torch.zeros(H)),
                lengths=torch.tensor([T, 2, 0]))
    if P:
        args["w_hr"] = torch.randn(P, H)
    return args


LSTM_BAD = [
    ("x", torch.randn(B, I), r"x must be 3-D \[T, B, I\]"),
    ("w_ih", torch.randn(4 * H, I + 1), r"w_ih must be \[4H, I\] with I=5"),
    ("w_ih", torch.randn(4 * H + 1, I), r"w_ih must be \[4H, I\]"),
    ("w_hh", torch.randn(4 * H, H + 1), r"w_hh must have shape \(44, 11\)"),
    ("h0", torch.zeros(1, H), r"h0 must have shape \(3, 11\), got \(1, 11\)"),  # would broadcast
    ("c0", torch.zeros(H), r"c0 must have shape \(3, 11\)"),
    ("b_ih", torch.randn(1), r"b_ih must have shape \(44,\), got \(1,\)"),  # would broadcast
    ("b_hh", torch.randn(4 * H, 1), r"b_hh must have shape \(44,\)"),
    ("ln", (torch.ones(4 * H), torch.zeros(4 * H), torch.ones(1), torch.zeros(H)),
     r"ln cell_weight must have shape \(11,\)"),
    ("lengths", torch.tensor([T, 2]), r"lengths must have shape \(3,\)"),
]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name,bad,msg", LSTM_BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(LSTM_BAD)])
def test_lstm_sequence_shapes(name, bad, msg, backend):
    args = _lstm_args()
    fused_rnn.lstm_sequence(**args, backend=backend)  # well-shaped: runs
    args[name] = bad
    with pytest.raises(ValueError, match=msg):
        fused_rnn.lstm_sequence(**args, backend=backend)


def test_lstm_sequence_projection_shapes():
    args = _lstm_args(P=4)
    out, h_n, c_n = fused_rnn.lstm_sequence(**args)
    assert out.shape == (T, B, 4) and h_n.shape == (B, 4) and c_n.shape == (B, H)
    for name, bad, msg in [("w_hr", torch.randn(4, H + 1), r"w_hr must be \[P, H=11\]"),
                           ("w_hh", torch.randn(4 * H, H), r"w_hh must have shape \(44, 4\)"),
                           ("h0", torch.zeros(B, H), r"h0 must have shape \(3, 4\)")]:
        wrong = dict(args, **{name: bad})
        with pytest.raises(ValueError, match=msg):
            fused_rnn.lstm_sequence(**wrong)


def test_rnn_sequence_shapes():
    args = dict(x=torch.randn(T, B, I), h0=torch.zeros(B, H), w_ih=torch.randn(H, I), w_hh=torch.randn(H, H),
                b_ih=torch.randn(H), b_hh=torch.randn(H), lengths=torch.tensor([T, 2, 0]))
    fused_rnn.rnn_sequence(**args)
    for name, bad, msg in [("w_ih", torch.randn(H, I + 2), r"w_ih must be \[H, I\] with I=5"),
                           ("w_hh", torch.randn(H, 2 * H), r"w_hh must have shape \(11, 11\)"),
                           ("h0", torch.zeros(1, H), r"h0 must have shape \(3, 11\)"),
                           ("b_hh", torch.randn(1), r"b_hh must have shape \(11,\)"),
                           ("lengths", torch.tensor([1]), r"lengths must have shape \(3,\)")]:
        with pytest.raises(ValueError, match=msg):
            fused_rnn.rnn_sequence(**dict(args, **{name: bad}))


# --------------------- argument types, devices and values: the same error on every backend
BACKENDS = ["reference", pytest.param("triton", marks=requires_kernels)]


def _rnn_args():
    """Well-formed rnn_sequence arguments (B 3, I 5, H 11)."""
    return dict(x=torch.randn(T, B, I), h0=torch.zeros(B, H), w_ih=torch.randn(H, I), w_hh=torch.randn(H, H),
                b_ih=torch.randn(H), b_hh=torch.randn(H), lengths=torch.tensor([T, 2, 0]))


def _ln(*parts):
    """The LayerNorm tuple with ``parts`` ((index, tensor) pairs) replaced."""
    ln = [torch.ones(4 * H), torch.zeros(4 * H), torch.ones(H), torch.zeros(H)]
    for i, t in parts:
        ln[i] = t
    return tuple(ln)


META = torch.device("meta")
# (function, argument, bad value, exception, message): every message names the argument
ARG_BAD = [
    ("lstm", "x", torch.ones(T, B, I, dtype=torch.int64), TypeError, r"x must be a floating-point tensor"),
    ("lstm", "x", [[0.0] * I] * B, TypeError, r"x must be a torch.Tensor, got list"),
    ("lstm", "h0", None, TypeError, r"h0 must be a torch.Tensor, got NoneType"),
    ("lstm", "c0", None, TypeError, r"c0 must be a torch.Tensor, got NoneType"),
    ("lstm", "w_ih", torch.ones(4 * H, I, dtype=torch.int32), TypeError, r"w_ih must be a floating-point"),
    ("lstm", "w_hh", [[0.0] * H] * (4 * H), TypeError, r"w_hh must be a torch.Tensor, got list"),
    ("lstm", "b_ih", torch.ones(4 * H, dtype=torch.int64), TypeError, r"b_ih must be a floating-point"),
    ("lstm", "b_hh", [0.0] * (4 * H), TypeError, r"b_hh must be a torch.Tensor or None, got list"),
    ("lstm", "ln", (None,) * 4, TypeError, r"ln gate_weight is None: ln must be None \(the plain LSTM\)"),
    ("lstm", "ln", _ln((2, None)), TypeError, r"ln cell_weight is None"),
    ("lstm", "ln", torch.ones(4, H), TypeError, r"ln must be None or a tuple of 4 tensors"),
    ("lstm", "ln", _ln((3, torch.zeros(H, dtype=torch.int64))), TypeError, r"ln cell_bias must be a floating-point"),
    ("lstm", "lengths", torch.tensor([7.0, 2.0, 1.0]), TypeError,
     r"lengths must be an integer tensor \(int32 or int64\), got torch.float32"),
    ("lstm", "lengths", torch.tensor([True, True, True]), TypeError, r"lengths must be an integer tensor"),
    ("lstm", "lengths", [7.0, 2.0, 1.0], TypeError, r"lengths given as a list must hold ints"),
    ("lstm", "lengths", "7,2,1", TypeError, r"lengths must be None, an int32 or int64 tensor, or a list of ints"),
    ("lstm", "lengths", torch.tensor([T + 1, 2, 1]), ValueError, r"lengths must lie in \[0, T=7\].*lengths\[0\] = 8"),
    ("lstm", "lengths", [T, 2, -1], ValueError, r"lengths must lie in \[0, T=7\].*lengths\[2\] = -1"),
    ("lstm", "lengths", torch.tensor([T, 2, 1], device=META), ValueError,
     r"lengths is on meta but x is on cpu; lengths must be on the CPU or on x's device"),
    ("lstm", "h0", torch.zeros(B, H, device=META), ValueError, r"h0 is on meta but x is on cpu"),
    ("lstm", "w_hh", torch.zeros(4 * H, H, device=META), ValueError, r"w_hh is on meta but x is on cpu"),
    ("lstm", "ln", _ln((1, torch.zeros(4 * H, device=META))), ValueError, r"ln gate_bias is on meta but x is on cpu"),
    ("lstm", "backend", "cuda", ValueError, r"backend must be one of \('auto', 'triton', 'reference'\), got 'cuda'"),
    ("rnn", "x", torch.ones(T, B, I, dtype=torch.int64), TypeError, r"x must be a floating-point tensor"),
    ("rnn", "h0", None, TypeError, r"h0 must be a torch.Tensor, got NoneType"),
    ("rnn", "w_ih", torch.ones(H, I, dtype=torch.int64), TypeError, r"w_ih must be a floating-point"),
    ("rnn", "lengths", torch.tensor([7.0, 2.0, 1.0]), TypeError, r"lengths must be an integer tensor"),
    ("rnn", "lengths", (T, 2, T + 3), ValueError, r"lengths must lie in \[0, T=7\].*lengths\[2\] = 10"),
    ("rnn", "h0", torch.zeros(B, H, device=META), ValueError, r"h0 is on meta but x is on cpu"),
    ("rnn", "nonlinearity", "gelu", ValueError, r"nonlinearity must be 'tanh' or 'relu', got 'gelu'"),
    ("rnn", "nonlinearity", None, ValueError, r"nonlinearity must be 'tanh' or 'relu', got None"),
    ("rnn", "backend", None, ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,name,bad,exc,msg", ARG_BAD,
                         ids=[f"{f}-{n}-{i}" for i, (f, n, *_) in enumerate(ARG_BAD)])
def test_sequence_argument_types(fn, name, bad, exc, msg, backend):
    """The functional entry points refuse what the layers refuse, before any backend runs: the
    same exception and message on every backend, naming the argument."""
    args = dict(_lstm_args(), backend=backend) if fn == "lstm" else dict(_rnn_args(), backend=backend)
    f = fused_rnn.lstm_sequence if fn == "lstm" else fused_rnn.rnn_sequence
    args[name] = bad
    with pytest.raises(exc, match=msg):
        f(**args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [[T, 2, 0], (T, 2, 0), torch.tensor([T, 2, 0], dtype=torch.int32)],
                         ids=["list", "tuple", "int32"])
def test_sequence_lengths_forms(lengths, backend):
    """lengths as a list or tuple of ints (as pack_padded_sequence takes them) or an int32
    tensor: the same result as the int64 tensor."""
    args = _lstm_args()
    want = fused_rnn.lstm_sequence(**args, backend=backend)
    got = fused_rnn.lstm_sequence(**dict(args, lengths=lengths), backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    r = _rnn_args()
    want = fused_rnn.rnn_sequence(**r, backend=backend)
    got = fused_rnn.rnn_sequence(**dict(r, lengths=lengths), backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# meta tensors run the reference path (shapes only) on every backend, the triton backend
# included without a GPU or the interpreter: no requires_kernels mark
@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_sequence_meta(backend):
    """Meta tensors give meta outputs of the right shapes, as torch.nn.LSTM does on "meta";
    lengths may stay on the CPU (checked there)."""
    args = {k: (v.to(META) if isinstance(v, torch.Tensor) else tuple(t.to(META) for t in v))
            for k, v in _lstm_args(P=4).items() if k != "lengths"}
    out, h_n, c_n = fused_rnn.lstm_sequence(**args, lengths=torch.tensor([T, 2, 0]), backend=backend)
    assert out.device == META and (out.shape, h_n.shape, c_n.shape) == ((T, B, 4), (B, 4), (B, H))
    r = {k: v.to(META) for k, v in _rnn_args().items()}
    out, h_n = fused_rnn.rnn_sequence(**r, backend=backend)
    assert out.device == META and (out.shape, h_n.shape) == ((T, B, H), (B, H))
    for cell in (fused_rnn.LSTMCell(I, H, layer_norm=True, device=META, backend=backend),
                 fused_rnn.RNNCell(I, H, device=META, backend=backend)):
        h = cell(torch.randn(B, I, device=META))
        assert (h[0] if isinstance(h, tuple) else h).shape == (B, H)


@pytest.mark.filterwarnings("ignore:fused_rnn. the LSTM kernels cannot take mixed dtypes")
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_mixed_float_dtypes_run(backend):
    """Floating dtypes may differ, as before these checks (the triton backend falls back to the
    reference path, with its warning)."""
    args = dict(_lstm_args(), h0=torch.zeros(B, H, dtype=torch.float64), b_ih=torch.randn(4 * H).half())
    out, _, _ = fused_rnn.lstm_sequence(**args, backend=backend)
    assert out.dtype == torch.float32


@requires_cuda
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sequence_cpu_lengths_with_cuda_input(backend):
    """lengths may stay on the CPU (where their values are checked) while x is on the GPU."""
    args = {k: (v.cuda() if isinstance(v, torch.Tensor) else tuple(t.cuda() for t in v))
            for k, v in _lstm_args().items() if k != "lengths"}
    want = fused_rnn.lstm_sequence(**args, lengths=torch.tensor([T, 2, 0], device="cuda"), backend=backend)
    got = fused_rnn.lstm_sequence(**args, lengths=torch.tensor([T, 2, 0]), backend=backend)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
