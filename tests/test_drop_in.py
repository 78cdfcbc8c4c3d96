"""fused_rnn's layers as torch.nn's kind of module: what isinstance answers, what
torch.ao.quantization does with them and fused_rnn.to_torch (the way through), whole-model
torch.save / torch.load under torch's default weights_only=True, and a training script shaped as
pytorch/examples' word_language_model (whole-model save, default reload) run end to end.

State dicts loading both ways with torch.nn: tests/test_layers.py; torch.compile(fullgraph=True)
of every layer: tests/test_compile.py.
"""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_rnn
from conftest import kernel_device, rel_err, requires_kernels

B, T, I, H, P = 3, 5, 4, 7, 3

# kind -> (constructor, its extra arguments): each on the reference path, some on the kernels
KINDS = {
    "lstm": (fused_rnn.LSTM, dict(num_layers=2, bidirectional=True)),
    "lstm_proj": (fused_rnn.LSTM, dict(num_layers=2, proj_size=P, batch_first=True)),
    "lnlstm": (fused_rnn.LSTM, dict(num_layers=2, bidirectional=True, layer_norm=True)),
    "rnn_tanh": (fused_rnn.RNN, dict(num_layers=2, bidirectional=True)),
    "rnn_relu": (fused_rnn.RNN, dict(nonlinearity="relu", bias=False, batch_first=True)),
    "lstm_cell": (fused_rnn.LSTMCell, {}),
    "lnlstm_cell": (fused_rnn.LSTMCell, dict(layer_norm=True)),
    "rnn_cell": (fused_rnn.RNNCell, dict(nonlinearity="relu")),
    "gru": (fused_rnn.GRU, dict(num_layers=2, bidirectional=True)),
    "gru_cell": (fused_rnn.GRUCell, {}),
}
TWINS = {fused_rnn.LSTM: nn.LSTM, fused_rnn.RNN: nn.RNN, fused_rnn.GRU: nn.GRU, fused_rnn.LSTMCell: nn.LSTMCell,
         fused_rnn.RNNCell: nn.RNNCell, fused_rnn.GRUCell: nn.GRUCell}


def _make(kind, backend="reference", device="cpu", dtype=torch.float64):
    cls, kw = KINDS[kind]
    torch.manual_seed(0)
    m = cls(I, H, backend=backend, **kw).to(device=device, dtype=dtype)
    if "cell" in kind:
        x = torch.randn(B, I, device=device, dtype=dtype)
    else:
        x = torch.randn((B, T, I) if m.batch_first else (T, B, I), device=device, dtype=dtype)
    return m, x


def _tensors(out):
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _tensors(o)]


def test_isinstance_answers():
    # the sequence layers derive from nn.RNNBase (Dynamo refuses to trace nn.LSTM / nn.RNN
    # instances without torch._dynamo.config.allow_rnn), the cells from torch.nn's own cells
    lstm, rnn = fused_rnn.LSTM(I, H), fused_rnn.RNN(I, H)
    assert not isinstance(lstm, nn.LSTM) and not isinstance(rnn, nn.RNN)
    assert isinstance(lstm, nn.RNNBase) and isinstance(rnn, nn.RNNBase)
    assert isinstance(fused_rnn.LSTMCell(I, H), nn.LSTMCell)
    assert isinstance(fused_rnn.RNNCell(I, H), nn.RNNCell)


class _Net(nn.Module):
    def __init__(self, lstm_kw=None):
        super().__init__()
        self.lstm = fused_rnn.LSTM(I, H, num_layers=2, **(lstm_kw or {}))
        self.rnn = fused_rnn.RNN(H, H, nonlinearity="relu")
        self.cell = fused_rnn.LSTMCell(I, H)
        self.rnn_cell = fused_rnn.RNNCell(H, H)
        self.head = nn.Linear(H, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.rnn(y)
        h, _ = self.cell(x[-1])
        return self.head(y[-1] + self.rnn_cell(h))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao.quantization's own notice
@pytest.mark.filterwarnings("ignore:.*quantize_per_tensor")
def test_quantize_dynamic_skips_ours_to_torch_is_the_way_through():
    torch.manual_seed(0)
    net, x = _Net().eval(), torch.randn(T, B, I)
    quantize = torch.ao.quantization.quantize_dynamic
    # torch matches modules by exact type: ours are left as they are, silently (the cell too,
    # though isinstance(cell, nn.LSTMCell)); naming our classes in qconfig_spec changes nothing
    for spec in (None, {fused_rnn.LSTM, fused_rnn.LSTMCell, nn.Linear}):
        q = quantize(net, spec, dtype=torch.qint8)
        assert type(q.head) is torch.ao.nn.quantized.dynamic.Linear
        assert [type(q.lstm), type(q.cell)] == [fused_rnn.LSTM, fused_rnn.LSTMCell]
    # to_torch: torch.nn's twins holding the same weights, then quantized as torch.nn's would be
    t = fused_rnn.to_torch(net)
    types = [type(t.lstm), type(t.rnn), type(t.cell), type(t.rnn_cell)]
    assert types == [nn.LSTM, nn.RNN, nn.LSTMCell, nn.RNNCell]
    assert type(net.lstm) is fused_rnn.LSTM  # not in place: the model is copied
    with torch.no_grad():
        assert rel_err(t(x), net(x)) < 1e-5
        q = quantize(t, dtype=torch.qint8)
        dyn = torch.ao.nn.quantized.dynamic
        types = [type(q.lstm), type(q.cell), type(q.rnn_cell)]
        assert types == [dyn.LSTM, dyn.LSTMCell, dyn.RNNCell]
        assert rel_err(q(x), net(x)) < 0.1  # int8 weights


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("ln")])
def test_to_torch_gives_torch_nn_twin_with_the_same_parameters(kind):
    m, x = _make(kind)
    m.eval()
    t = fused_rnn.to_torch(m, inplace=True)
    assert type(t) is TWINS[type(m)] and not t.training
    assert [(n, p) for n, p in t.named_parameters()] == [(n, p) for n, p in m.named_parameters()]
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(_tensors(t(x)), _tensors(m(x))))
    assert all(p is not q for p, q in zip(fused_rnn.to_torch(m).parameters(), m.parameters()))


def test_to_torch_refuses_layer_norm_before_changing_anything():
    net = _Net(dict(layer_norm=True))
    with pytest.raises(ValueError, match="layer_norm=True"):
        fused_rnn.to_torch(net, inplace=True)
    assert type(net.cell) is fused_rnn.LSTMCell
    shared = fused_rnn.RNN(I, H)
    pair = fused_rnn.to_torch(nn.ModuleList([shared, shared]))
    assert type(pair[0]) is nn.RNN and pair[0] is pair[1]  # a shared layer stays shared


def test_torch_nn_layers_need_allow_listing_ours_do_not(tmp_path):
    # torch's own layers are not on its default weights_only list: a whole nn.LSTM does not load
    torch.save(nn.LSTM(I, H), tmp_path / "nn.pt")
    with pytest.raises(pickle.UnpicklingError, match="torch.nn.modules.rnn.LSTM"):
        torch.load(tmp_path / "nn.pt")
    # a user's safe_globals block naming our class (as torch's message advises) must not remove
    # our registration on its way out
    torch.save(fused_rnn.LSTM(I, H), tmp_path / "ours.pt")
    with torch.serialization.safe_globals([fused_rnn.LSTM]):
        torch.load(tmp_path / "ours.pt")
    assert type(torch.load(tmp_path / "ours.pt")) is fused_rnn.LSTM


def test_layers_define_no_code_that_runs_on_load():
    # registering them as safe globals rests on this: unpickling runs only torch's own code
    hooks = ("__new__", "__init_subclass__", "__reduce__", "__reduce_ex__", "__getstate__",
             "__setstate__", "__setattr__", "__getattr__", "__getattribute__", "__set_name__")
    for cls in TWINS:
        for klass in cls.__mro__:
            if klass.__module__.startswith("fused_rnn"):
                assert not [h for h in hooks if h in vars(klass)], klass


def _save_load_check(kind, backend, device, tmp_path):
    m, x = _make(kind, backend, device)
    path = tmp_path / "layer.pt"
    torch.save(m, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    m2 = torch.load(path)  # torch's default: weights_only=True
    assert type(m2) is type(m) and repr(m2) == repr(m)  # the backend and layer_norm included
    assert m2.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), m.state_dict().values()))
    for a, b in zip(_tensors(m2(x)), _tensors(m(x))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_whole_layer_loads_with_torch_load_defaults(kind, tmp_path):
    _save_load_check(kind, "reference", "cpu", tmp_path)


@requires_kernels
@pytest.mark.parametrize("kind", ["lstm", "lnlstm", "rnn_tanh", "lstm_cell"])
def test_whole_layer_loads_with_torch_load_defaults_triton(kind, tmp_path):
    _save_load_check(kind, "triton", kernel_device(), tmp_path)


# --- A script written the way pytorch/examples' word_language_model is, on a tiny corpus ---

_GRAMMAR = [["the", "a"], ["cat", "dog", "bird"], ["sat", "ran", "slept"], ["on", "under"],
            ["the", "a"], ["mat", "rug", "log"]]


def _write_corpus(root, sizes):
    g = torch.Generator().manual_seed(0)
    for split, n in sizes.items():
        pick = lambda words: words[torch.randint(len(words), (), generator=g)]  # noqa: E731
        lines = [" ".join(pick(w) for w in _GRAMMAR) for _ in range(n)]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def _read_corpus(root, splits):
    vocab, out = {}, {}
    for split in splits:
        lines = (root / f"{split}.txt").read_text().splitlines()
        words = [w for line in lines for w in line.split() + ["<eos>"]]
        out[split] = torch.tensor([vocab.setdefault(w, len(vocab)) for w in words])
    return vocab, out


class _WordModel(nn.Module):
    """Embedding, recurrent layer, decoder to log-probabilities; `lib` is torch.nn or fused_rnn."""

    def __init__(self, lib, rnn_type, ntokens, emsize, nhid, nlayers, dropout, **rnn_kw):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntokens, emsize)
        if rnn_type in ("LSTM", "GRU"):  # the script's getattr(nn, rnn_type)
            self.rnn = getattr(lib, rnn_type)(emsize, nhid, nlayers, dropout=dropout, **rnn_kw)
        else:
            self.rnn = lib.RNN(emsize, nhid, nlayers, nonlinearity="tanh", dropout=dropout,
                               **rnn_kw)
        self.decoder = nn.Linear(nhid, ntokens)
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers

    def forward(self, tokens, hidden):
        self.rnn.flatten_parameters()
        out, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return F.log_softmax(self.decoder(self.drop(out)).flatten(0, 1), dim=-1), hidden

    def init_hidden(self, bsz):
        w = next(self.parameters())
        h = w.new_zeros(self.nlayers, bsz, self.nhid)
        return (h, w.new_zeros(self.nlayers, bsz, self.nhid)) if self.rnn_type == "LSTM" else h


def _detach(hidden):
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return tuple(_detach(h) for h in hidden)


def _columns(ids, bsz, device):
    n = ids.numel() // bsz
    return ids[: n * bsz].view(bsz, n).t().contiguous().to(device)


def _run_script(lib, rnn_type, device, tmp_path, sizes, epochs, **rnn_kw):
    """Train, keep the best model with torch.save(model), reload it with a plain torch.load under
    the allow-list of torch.nn classes the stock script names, and test it. Returns the
    validation losses, the test loss at the best save, the reloaded model, its test loss, and
    the loss of a uniform guess."""
    _write_corpus(tmp_path, sizes)
    vocab, ids = _read_corpus(tmp_path, sizes)
    bsz, eval_bsz, bptt, clip = 4, 2, 6, 0.25
    train, valid, test = (_columns(ids[s], b, device) for s, b in
                          (("train", bsz), ("valid", eval_bsz), ("test", eval_bsz)))
    torch.manual_seed(1)
    model = _WordModel(lib, rnn_type, len(vocab), 8, 10, 2, 0.2, **rnn_kw).to(device)
    criterion = nn.NLLLoss()

    def evaluate(model, data):
        model.eval()
        total, hidden = 0.0, model.init_hidden(eval_bsz)
        with torch.no_grad():
            for i in range(0, data.size(0) - 1, bptt):
                x, y = data[i:i + bptt], data[i + 1:i + 1 + bptt]
                x = x[: y.size(0)]
                out, hidden = model(x, hidden)
                total += x.size(0) * criterion(out, y.flatten()).item()
                hidden = _detach(hidden)
        return total / (data.size(0) - 1)

    lr, best, val_losses, saved_test = 5.0, None, [], None
    for _ in range(epochs):
        model.train()
        hidden = model.init_hidden(bsz)
        for i in range(0, train.size(0) - 1, bptt):
            x, y = train[i:i + bptt], train[i + 1:i + 1 + bptt]
            x = x[: y.size(0)]
            model.zero_grad()
            hidden = _detach(hidden)
            out, hidden = model(x, hidden)
            criterion(out, y.flatten()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
        val_losses.append(evaluate(model, valid))
        if best is None or val_losses[-1] < best:
            torch.save(model, tmp_path / "model.pt")
            best, saved_test = val_losses[-1], evaluate(model, test)
        else:
            lr /= 4.0
    stock_list = [_WordModel, nn.Dropout, nn.Linear, nn.GRU, nn.LSTM, nn.RNN, nn.Embedding]
    with torch.serialization.safe_globals(stock_list):
        loaded = torch.load(tmp_path / "model.pt")
    loaded.rnn.flatten_parameters()
    return val_losses, saved_test, loaded, evaluate(loaded, test), math.log(len(vocab))


@pytest.mark.parametrize("rnn_type", ["LSTM", "RNN_TANH", "GRU"])
def test_word_language_model_script_trains_saves_and_reloads(rnn_type, tmp_path):
    sizes = dict(train=60, valid=10, test=10)
    val, saved_test, loaded, test_loss, uniform = _run_script(fused_rnn, rnn_type, "cpu", tmp_path,
                                                              sizes, 3)
    assert type(loaded.rnn) is getattr(fused_rnn, rnn_type.split("_")[0])
    assert test_loss == saved_test
    assert min(val) < 0.8 * uniform  # it learned the grammar's constraints
    # the same script with torch.nn's layer (the control): the same losses, from the same seed
    (tmp_path / "nn").mkdir()
    val_nn, _, _, test_nn, _ = _run_script(nn, rnn_type, "cpu", tmp_path / "nn", sizes, 3)
    assert max(abs(a - b) for a, b in zip(val, val_nn)) < 1e-4 and abs(test_loss - test_nn) < 1e-4


@requires_kernels
@pytest.mark.parametrize("rnn_type", ["LSTM", "RNN_TANH"])
def test_word_language_model_script_triton(rnn_type, tmp_path):
    sizes = dict(train=8, valid=2, test=2)
    _, saved_test, loaded, test_loss, _ = _run_script(fused_rnn, rnn_type, kernel_device(),
                                                      tmp_path, sizes, 2, backend="triton")
    assert loaded.rnn.backend == "triton"
    assert abs(test_loss - saved_test) <= 1e-6 * abs(saved_test)
