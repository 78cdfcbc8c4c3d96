"""fused_rnn: Triton kernels for fast, correct recurrent networks in PyTorch."""
from ._version import __version__
from .layers import LSTM, RNN, LSTMCell, RNNCell, to_torch
from ._paths import use_path
from .lstm import lstm_sequence
from .rnn import rnn_sequence

__all__ = ["__version__", "LSTM", "RNN", "LSTMCell", "RNNCell", "lstm_sequence", "rnn_sequence", "to_torch", "use_path"]
