"""Triton kernels of fused_rnn (ships as fused_rnn.kernels)."""
