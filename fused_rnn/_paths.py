"""Which implementation runs a layer's time loop (the one place that chooses), the CUDA graph
cache, and the scope every op launches in.

Paths of the custom ops (fused_rnn/lstm.py, rnn.py, gru.py; lstm_proj.py and gru.py have no
persistent kernel, so "persistent" runs their step path, with the warning below):
    step        one fused Triton launch per time step, eagerly (kernels/lstm.py, kernels/rnn.py)
    graph       the step path's whole launcher captured once per shape in a CUDA graph and
                replayed (CUDA only)
    persistent  one launch for all T steps (kernels/tiles.py's plan: a grid that fits on
                the SMs, rows in blocks of up to 64 with a barrier each)
    adaptive    on CUDA: persistent where its plan fits, else graph where a capture is
                possible, else step; on the CPU: step. Silent: it asks for nothing it cannot get
    auto        on CUDA: the path measured fastest for this device, cell, dtype and shape class
                (fused_rnn/data/path_policy.json, written by bench/write_policy.py), silently
                run the step path where it cannot run; else (a CPU tensor, a problem not in the
                table) AUTO_PATH, "step" until the other paths are measured on a GPU

Every path writes the same saved tensors in the same layouts, so a forward on one path pairs
with a backward on any other. A path that cannot run a problem runs the step path instead; an
explicit request that cannot be met warns once.

Choosing (first match wins): the ``path`` argument of the ops / autograd Functions when not
"auto"; ``use_path(name)`` (a context variable: per thread; the Functions fix the forward's
request for their backward, which the engine may run on another thread); the environment
variable FUSED_RNN_PATH, read at each call; AUTO_PATH. resolve() decides once per call, the
persistent plan included, and the launchers take that plan.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.resources
import json
import os
import threading
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch

from ._backend import interpreter_on, warn_once
from .kernels import config

PATHS = ("auto", "step", "graph", "persistent", "adaptive")
ENV_VAR = "FUSED_RNN_PATH"
AUTO_PATH = "step"  # where the path table lists no measurement (docs/step-kernels.md)

_override: contextvars.ContextVar = contextvars.ContextVar("fused_rnn_path", default=None)


def forward_request(path: str) -> str:
    """The path the caller's thread asks for (use_path is per context), fixed in an autograd
    Function's forward for its backward, which the engine may run on another thread. Traced
    forwards keep "auto": the op then reads the request where it runs."""
    return path if torch.compiler.is_compiling() else requested(path)


def _check(name: str, what: str) -> str:
    if name not in PATHS:
        raise ValueError(f"{what} must be one of {PATHS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_path(name: str):
    """Run every fused_rnn layer on path ``name`` inside the block (forward and backward; the
    block must contain the backward too, or the forward hands its request on, see
    ``requested``). Per thread and per context: other threads are not affected, and leaving the
    block restores exactly what was in force at its entry."""
    _check(name, "use_path")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def requested(path: str = "auto") -> str:
    """The path asked for: the argument, else use_path(), else FUSED_RNN_PATH, else "auto"."""
    _check(path, "path")
    if path != "auto":
        return path
    override = _override.get()
    if override is not None and override != "auto":
        return override
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def graph_unavailable(x: torch.Tensor) -> Tuple[Optional[str], bool]:
    """(why the graph path cannot run for x, whether to warn about it), or (None, False)."""
    if not x.is_cuda:
        return "CUDA graphs need CUDA tensors", True
    if interpreter_on():
        return "the Triton interpreter (TRITON_INTERPRET=1) is on", True
    if torch.cuda.is_current_stream_capturing():
        # inside someone else's capture (e.g. torch.compile mode="reduce-overhead"): the eager
        # step launches are captured into that graph, which is what the caller wants
        return "a CUDA graph capture is in progress", False
    return None, False


_resolution_logs: list = []


@contextlib.contextmanager
def record_resolutions():
    """Collect (op, path) for every resolve() inside the block (fused-rnn check uses it to tell a
    case the requested path really ran from one that fell back to the step path)."""
    log: list = []
    _resolution_logs.append(log)
    try:
        yield log
    finally:
        _resolution_logs.remove(log)


def resolve(op: str, path: str, x: torch.Tensor, persistent_plan: Callable[[], Tuple[object, str]],
            cell: Optional[str] = None, hidden: Optional[int] = None) -> Tuple[str, object]:
    """(the path that will run op ("lstm_fwd", ...) for input x: "step", "graph" or "persistent",
    the persistent plan: not None exactly on the persistent path). ``persistent_plan()`` returns
    (plan or None, why not) for this problem; it is called at most once. ``cell`` (one of
    POLICY_CELLS) and ``hidden`` (H) key the measured policy that "auto" reads; without them
    "auto" is AUTO_PATH."""
    got, plan = _resolve(op, path, x, persistent_plan, cell, hidden)
    for log in _resolution_logs:
        log.append((op, got))
    return got, plan


def _resolve(op, path, x, persistent_plan, cell=None, hidden=None):
    req = requested(path)
    if req == "auto":
        best = measured_path(x, cell, hidden)
        if best is not None:  # the table's choice, silently the step path where it cannot run
            if best == "graph":
                return ("graph" if graph_unavailable(x)[0] is None else "step"), None
            if best == "persistent":
                plan = persistent_plan()[0]
                return ("persistent", plan) if plan is not None else ("step", None)
            return "step", None
        req = AUTO_PATH
    if req == "adaptive":
        if not x.is_cuda or interpreter_on():
            return "step", None
        plan = persistent_plan()[0]
        if plan is not None:
            return "persistent", plan
        return ("graph" if graph_unavailable(x)[0] is None else "step"), None
    if req == "graph":
        why, warn = graph_unavailable(x)
        if why is None:
            return "graph", None
        if warn:
            warn_once(f"path:graph:{why}", f"fused_rnn: graph path not possible ({why}); using the step kernels")
        return "step", None
    if req == "persistent":
        plan, why = persistent_plan()
        if plan is not None:
            return "persistent", plan
        warn_once(f"path:persistent:{op}:{why}",
                  f"fused_rnn: persistent path not possible for {op} ({why}); using the step kernels")
    return "step", None


# ---------------------------------------------------------------------- the measured policy
# fused_rnn/data/path_policy.json: per device name (torch.cuda.get_device_name), the path that a
# `fused-rnn bench` run on that card measured fastest for each cell, dtype and shape class, and
# where that came from. Read once, on the first "auto" resolution of a CUDA tensor.
POLICY_FILE = "path_policy.json"
POLICY_FORMAT = 1
POLICY_CELLS = ("lstm", "lnlstm", "lstm_proj", "rnn", "gru")
POLICY_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
POLICY_PATHS = ("step", "graph", "persistent")
BATCH_CLASSES = (16, 64)  # B <= 16, <= 64, more
HIDDEN_CLASSES = (256, 1024)  # H <= 256, <= 1024, more


def _bucket(n: int, bounds: Tuple[int, ...], name: str) -> str:
    return next((f"{name}<={b}" for b in bounds if n <= b), f"{name}>{bounds[-1]}")


def shape_class(batch: int, hidden: int) -> str:
    """The policy's shape class of a problem: its batch (<= 16, <= 64, more) by its hidden size
    (<= 256, <= 1024, more), e.g. "B<=16,H<=256" or "B>64,H>1024"."""
    return f"{_bucket(batch, BATCH_CLASSES, 'B')},{_bucket(hidden, HIDDEN_CLASSES, 'H')}"


SHAPE_CLASSES = tuple(shape_class(b, h) for b in (*BATCH_CLASSES, BATCH_CLASSES[-1] + 1)
                      for h in (*HIDDEN_CLASSES, HIDDEN_CLASSES[-1] + 1))


def validate_policy(table: dict) -> dict:
    """``table`` if it is a policy table of this format (known cells, dtypes, shape classes and
    paths, each device with its source), else ValueError saying what is wrong."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"path policy: {what}")

    need(isinstance(table, dict) and table.get("format") == POLICY_FORMAT, f"format must be {POLICY_FORMAT}")
    devices = table.get("devices")
    need(isinstance(devices, dict), "'devices' must be an object")
    for dev, d in devices.items():
        need(isinstance(d, dict) and isinstance(d.get("source"), dict)
             and {"run", "date"} <= set(d["source"]), f"{dev}: 'source' needs 'run' and 'date'")
        need(isinstance(d.get("entries"), dict), f"{dev}: 'entries' must be an object")
        for cell, by_dtype in d["entries"].items():
            need(cell in POLICY_CELLS, f"{dev}: unknown cell {cell!r}")
            for dt, by_shape in by_dtype.items():
                need(dt in POLICY_DTYPES.values(), f"{dev} {cell}: unknown dtype {dt!r}")
                for sc, e in by_shape.items():
                    need(sc in SHAPE_CLASSES, f"{dev} {cell} {dt}: unknown shape class {sc!r}")
                    need(isinstance(e, dict) and e.get("path") in POLICY_PATHS,
                         f"{dev} {cell} {dt} {sc}: path must be one of {POLICY_PATHS}")
    return table


_policy: Optional[dict] = None
_device_names: dict = {}


def policy_table() -> dict:
    """The shipped table, loaded and validated on first use."""
    global _policy
    if _policy is None:
        text = importlib.resources.files("fused_rnn").joinpath("data", POLICY_FILE).read_text()
        _policy = validate_policy(json.loads(text))
    return _policy


def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name of a CUDA device, asked once per device index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _device_names[index]


def measured_path(x: torch.Tensor, cell: Optional[str], hidden: Optional[int]) -> Optional[str]:
    """The table's path for this problem on x's device ([T, B, I] input, hidden size ``hidden``),
    or None: a CPU tensor, no policy key, or nothing measured for it."""
    if cell is None or hidden is None or not x.is_cuda:
        return None
    devices = policy_table()["devices"]
    if not devices:  # nothing measured anywhere: not even the device name is asked for
        return None
    entries = devices.get(device_name(x.device), {}).get("entries", {})
    dt = POLICY_DTYPES.get(x.dtype)
    entry = entries.get(cell, {}).get(dt, {}).get(shape_class(x.shape[1], hidden))
    return None if entry is None else entry["path"]


# ------------------------------------------------------------------------------ launch scope
# The Triton interpreter is not thread-safe (a launch patches triton.language for its duration):
# ops on CPU tensors, which run through it, take turns. CUDA launches need no lock.
_INTERPRETER_LOCK = threading.RLock()


@contextlib.contextmanager
def launching(x: torch.Tensor):
    """The scope of one op's launches: autocast off (the launchers choose every dtype), and on
    CPU tensors the interpreter's lock."""
    lock = contextlib.nullcontext() if x.is_cuda else _INTERPRETER_LOCK
    with lock, torch.autocast(x.device.type, enabled=False):
        yield


def launch(op: str, path: str, x: torch.Tensor, persistent_plan: Callable[[], Tuple[object, str]],
           fn: Callable, args: tuple, static_key: tuple, cell: Optional[str] = None,
           hidden: Optional[int] = None):
    """Run op's launcher ``fn(*args, plan=...)`` on the path resolve() picks (``cell``, ``hidden``:
    its policy key), in the launch scope: with the persistent plan, or None for the step loop; the
    graph path replays the step loop's launcher from a cached CUDA graph (``static_key``: fn's
    other arguments)."""
    p, plan = resolve(op, path, x, persistent_plan, cell, hidden)
    with launching(x):
        if p == "graph":
            return graphed(op, functools.partial(fn, plan=None), args, static_key)
        return fn(*args, plan=plan)


def or_empty(values, refs) -> tuple:
    """Custom ops cannot return None: each absent value as an empty tensor like its ref's."""
    return tuple(r.new_empty(0) if v is None else v for v, r in zip(values, refs))


def fake_grads(x, need_dx: bool, need_dw: bool, weights, ln=(None,) * 4):
    """A backward op's fake dx, weight gradients, db [G] (state dtype) and LN parameter gradients:
    each its input's shape, or [0] where not asked for (or without LN)."""
    dx = x.new_empty(x.shape if need_dx else 0)
    dw = tuple(w.new_empty(w.shape if need_dw else 0) for w in weights)
    db = x.new_empty(weights[0].shape[0] if need_dw else 0, dtype=config.state_dtype(x.dtype))
    with_ln = need_dw and ln[0] is not None
    return dx, dw, db, tuple(p.new_empty(p.shape) if with_ln else x.new_empty(0) for p in ln)


# ------------------------------------------------------------------------------- CUDA graphs
# One graph per key (op name, the launcher's non-tensor arguments, the options in force, the shape /
# dtype / device of every tensor argument and which ones are None), holding static copies of the
# inputs, the launcher's outputs (in the graph's private memory pool) and an event recorded after
# the last replay's outputs were cloned. A call copies its tensors in, replays, and returns clones
# of the static outputs, so results never alias a later replay. Each graph keeps its buffers
# alive (docs/step-kernels.md), hence the small bound.
GRAPH_CACHE_MAX = 4


class _Graph:
    __slots__ = ("graph", "static_in", "static_out", "done")

    def __init__(self, graph, static_in, static_out):
        self.graph = graph
        self.static_in = static_in
        self.static_out = static_out
        self.done: Optional[torch.cuda.Event] = None


_graphs: "OrderedDict[tuple, Optional[_Graph]]" = OrderedDict()  # None: capture failed, run eagerly
_graphs_lock = threading.Lock()


def _arg_key(a):
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.dtype, a.device)
    if isinstance(a, (tuple, list)):
        return ("S",) + tuple(_arg_key(v) for v in a)
    raise TypeError(f"graphed launcher arguments must be tensors, None or tuples of them, not {type(a)}")


def _static_copy(a):
    if a is None:
        return None
    if isinstance(a, torch.Tensor):  # contiguous, whatever the caller's strides
        return torch.empty(a.shape, dtype=a.dtype, device=a.device).copy_(a)
    return tuple(_static_copy(v) for v in a)


def _copy_in(static, a) -> None:
    if isinstance(a, torch.Tensor):
        static.copy_(a)
    elif a is not None:
        for s, v in zip(static, a):
            _copy_in(s, v)


def _clone_out(o):
    if isinstance(o, torch.Tensor):
        return o.clone()
    if isinstance(o, (tuple, list)):
        return type(o)(_clone_out(v) for v in o)
    return o


def _warm_up(fn: Callable, static_in: tuple) -> None:
    """One eager call on a side stream: Triton JIT and cuBLAS handles happen here, never during
    the capture. Its errors are the launcher's own and propagate."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static_in)
    torch.cuda.current_stream().wait_stream(side)


def _capture(fn: Callable, static_in: tuple):
    graph = torch.cuda.CUDAGraph()
    # thread_local: only this thread's capture-unsafe CUDA calls invalidate the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out = fn(*static_in)
    return graph, static_out


def _evict_locked() -> None:
    while len(_graphs) > max(1, GRAPH_CACHE_MAX):  # the entry just added always stays
        _, old = _graphs.popitem(last=False)
        if old is not None and old.done is not None:
            old.done.synchronize()  # its last replay's outputs are cloned before its pool goes


def clear_graphs() -> None:
    """Drop every cached graph (and its memory)."""
    with _graphs_lock:
        for g in _graphs.values():
            if g is not None and g.done is not None:
                g.done.synchronize()
        _graphs.clear()


def graphed(op: str, fn: Callable, args: tuple, static_key: tuple):
    """fn(*args) through a cached CUDA graph. ``args``: tensors, None or tuples of them (all on
    one CUDA device); ``static_key``: every other argument fn depends on (hashable)."""
    dev = next(a for a in args if isinstance(a, torch.Tensor)).device
    # the options in force (forced tiles, poison...) are part of the key: a graph captured under
    # other options is never replayed
    key = (op, static_key, config.options(), tuple(_arg_key(a) for a in args))
    with _graphs_lock, torch.cuda.device(dev):
        if key not in _graphs:
            static_in = tuple(_static_copy(a) for a in args)
            _warm_up(fn, static_in)
            try:
                graph, static_out = _capture(fn, static_in)
                entry: Optional[_Graph] = _Graph(graph, static_in, static_out)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # a capture the CUDA runtime refused: eager from now on
                warn_once(f"graph-capture:{op}", f"fused_rnn: CUDA graph capture of {op} failed "
                                                 f"({str(e).splitlines()[0][:200]}); using the step kernels")
                entry = None
            _graphs[key] = entry
            _evict_locked()
        entry = _graphs[key]
        _graphs.move_to_end(key)
        if entry is None:
            return fn(*args)
        stream = torch.cuda.current_stream(dev)
        if entry.done is not None:  # the previous replay (maybe on another stream) is done with
            stream.wait_event(entry.done)  # the static buffers before they are overwritten
        for s, a in zip(entry.static_in, args):
            _copy_in(s, a)
        entry.graph.replay()
        out = _clone_out(entry.static_out)
        entry.done = torch.cuda.Event()
        entry.done.record(stream)
        return out
