"""fused_rnn: Triton kernels for fast, correct recurrent networks in PyTorch."""
from ._version import __version__
from .layers import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, to_torch
from ._paths import use_path
from .gru import gru_sequence
from .lstm import lstm_sequence
from .rnn import rnn_sequence

__all__ = ["__version__", "LSTM", "RNN", "GRU", "LSTMCell", "RNNCell", "GRUCell", "lstm_sequence", "rnn_sequence",
           "gru_sequence", "to_torch", "use_path"]
