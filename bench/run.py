#!/usr/bin/env python3
"""Thin runner for the benchmark suite: ``python bench/run.py ARGS`` == ``fused-rnn bench ARGS``.

The suite lives in the package (fused_rnn/bench/) so the installed command can run it; this
file only calls ``fused_rnn.bench.main``. Install the project first (``pip install -e .``):
fused_rnn.kernels is mapped from kernels/ by the install, so a bare source tree lacks it.
"""
import os
import sys

if __name__ == "__main__":
    try:
        from fused_rnn.bench import main
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from fused_rnn.bench import main
    sys.exit(main(sys.argv[1:]))
