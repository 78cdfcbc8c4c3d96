"""Bad input gets a ValueError or TypeError naming the argument and the expected shape."""
import pytest
import torch

import fused_rnn

B, T, I, H = 3, 7, 5, 11


@pytest.fixture(params=["lstm", "rnn"])
def layer(request):
    if request.param == "lstm":
        return fused_rnn.LSTM(I, H, num_layers=2)
    return fused_rnn.RNN(I, H, num_layers=2)


def _hx(layer, shape):
    """A zero initial state of ``shape`` in the form the layer takes."""
    h = torch.zeros(shape)
    return (h, torch.zeros(shape)) if isinstance(layer, fused_rnn.LSTM) else h


def test_wrong_rank(layer):
    with pytest.raises(ValueError, match=r"input must be 2-D .* got 4-D"):
        layer(torch.randn(T, B, I, 1))
    with pytest.raises(ValueError, match=r"got 1-D"):
        layer(torch.randn(I))


def test_wrong_feature_size(layer):
    with pytest.raises(ValueError, match=r"expected input_size=5"):
        layer(torch.randn(T, B, I + 1))


def test_wrong_dtype(layer):
    with pytest.raises(TypeError, match=r"float64 but input has dtype torch.float32|dtype torch.float32"):
        layer.double()(torch.randn(T, B, I))
    with pytest.raises(TypeError, match=r"floating-point"):
        layer(torch.ones(T, B, I, dtype=torch.int64))


def test_weights_on_another_device(layer):
    layer.to("meta")
    with pytest.raises(ValueError, match=r"is on meta but input is on cpu"):
        layer(torch.randn(T, B, I))


def test_state_of_wrong_shape(layer):
    name = r"hx\[0\] \(h_0\)" if isinstance(layer, fused_rnn.LSTM) else r"hx \(h_0\)"
    with pytest.raises(ValueError, match=name + r" must have shape \(2, 3, 11\), got \(1, 3, 11\)"):
        layer(torch.randn(T, B, I), _hx(layer, (1, B, H)))
    with pytest.raises(ValueError, match=r"must have shape \(2, 3, 11\), got \(2, 3\)"):
        layer(torch.randn(T, B, I), _hx(layer, (2, B)))
    with pytest.raises(ValueError, match=r"must have shape \(2, 3, 11\), got \(2, 1, 11\)"):
        layer(torch.randn(T, B, I), _hx(layer, (2, 1, H)))  # never broadcast over the batch


def test_c0_of_wrong_shape():
    m = fused_rnn.LSTM(I, H)
    with pytest.raises(ValueError, match=r"hx\[1\] \(c_0\) must have shape \(1, 3, 11\)"):
        m(torch.randn(T, B, I), (torch.zeros(1, B, H), torch.zeros(1, B, H + 1)))
    with pytest.raises(TypeError, match=r"tuple \(h_0, c_0\)"):
        m(torch.randn(T, B, I), torch.zeros(1, B, H))


def test_state_dtype_mismatch(layer):
    h0 = torch.zeros(2, B, H, dtype=torch.float64)
    hx = (h0, torch.zeros(2, B, H)) if isinstance(layer, fused_rnn.LSTM) else h0
    with pytest.raises(TypeError, match=r"h_0\) has dtype torch.float64"):
        layer(torch.randn(T, B, I), hx)


def test_zero_length_sequence(layer):
    with pytest.raises(ValueError, match=r"zero-length sequence"):
        layer(torch.randn(0, B, I))


def test_cells_bad_input():
    cell = fused_rnn.LSTMCell(I, H)
    with pytest.raises(ValueError, match=r"expected input_size=5"):
        cell(torch.randn(B, I + 2))
    with pytest.raises(ValueError, match=r"must be 1-D \(H_in,\) or 2-D"):
        cell(torch.randn(T, B, I))
    with pytest.raises(ValueError, match=r"must have shape \(3, 11\), got \(1, 11\)"):
        cell(torch.randn(B, I), (torch.zeros(1, H), torch.zeros(1, H)))
    rcell = fused_rnn.RNNCell(I, H).double()
    with pytest.raises(TypeError, match=r"dtype"):
        rcell(torch.randn(B, I))


def test_bad_nonlinearity():
    with pytest.raises(ValueError):
        fused_rnn.RNN(I, H, nonlinearity="gelu")


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
