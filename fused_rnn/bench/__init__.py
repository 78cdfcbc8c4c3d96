"""Benchmark suite: fused_rnn against cuDNN, the reference loop and torch.compile.

Run: ``fused-rnn bench [--quick] [--shapes S1,S2] [--cells lstm,lnlstm,rnn,lstm_proj] [--dtypes fp16,bf16]``
(or ``python bench/run.py ...``, or ``python -m fused_rnn.bench ...``); ``--help`` lists the rest.
bench/RESULTS.md says what each row and column is, and holds the measured tables.

For each cell (``lstm``, ``lnlstm``, ``rnn`` the tanh RNN; ``lstm_proj`` with proj_size H // 2
only when named), shape (B, T, H; input size H, one layer, time-major) and dtype, it times each
fused_rnn *path* (``triton`` by default; ``graph``, ``persistent``, ``triton-recompute`` on
request) against ``cudnn`` (torch.nn; also in fp16, the speed-up column's baseline), the
``reference`` loop and ``compile`` (torch.compile of the reference cell), forward under no_grad
and forward+backward. Without a GPU it runs a CPU mode (a tiny shape, wall-clock medians, the
Triton paths only under TRITON_INTERPRET=1) whose numbers say nothing about GPU speed.

The parts, each a module here:
  cases    shapes, cells, dtypes; the random Problem; the path registry; which rows run (the plan)
  paths    what a row runs: the fused_rnn paths and the baselines
  timing   how a row is timed (do_bench or wall clock, peak memory) into its JSON record
  targets  the project's targets T1-T6, pass/miss from the records
  report   machine line, markdown table, plot; bench.json / bench.md / bench.png
  command  the arguments, the sweep, the exit status
  cpu      the CPU table (--device cpu --cpu-table): torch.nn against fused_rnn's layers (auto)

Adding a path: ``cases.register_path("name", build, available)``, where ``build(problem)``
returns the forward callable (``paths.functional_path(backend)`` for a new ``backend=`` of the
entry points) and ``available(device)`` returns None or why it cannot run; ``--paths`` selects it.
"""
from . import paths  # noqa: F401  (registers the built-in paths)
from .command import main

__all__ = ["main"]
