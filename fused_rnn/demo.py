"""`fused-rnn demo`: a character-level LSTM language model on Macbeth, fused_rnn vs torch.nn.

The same model is trained twice on the same device, from the same initial weights (copied with
``load_state_dict``) and on the same batches: once with ``fused_rnn.LSTM`` as its recurrent layer,
once with ``torch.nn.LSTM``. Reports the loss curves, held-out loss, tokens per second of each,
and a short sample from the fused model; a third model, ``fused_rnn.LSTM(layer_norm=True)`` on the
same batches, shows what layer norm costs. On the CPU, backend "auto" runs torch's own ATen LSTM
op (fused_rnn's CPU route; the same computation as torch.nn) and, for layer norm, fused_rnn's
whole-sequence CPU route: neither says anything about the Triton kernels. The output says which
path and device ran next to every number.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from importlib import resources
from typing import Dict, List, Optional, TextIO

import torch
import torch.nn.functional as F
from torch import nn

TEXT = "macbeth.txt"  # see fused_rnn/data/README.txt for its source and public-domain status

LN_NAME = "fused_rnn.LSTM+LN"  # fused_rnn.LSTM(layer_norm=True)
QUICK = dict(steps=300, hidden_size=128, batch_size=32, seq_len=64)
FULL = dict(steps=1000, hidden_size=256, batch_size=64, seq_len=128)
EMBED = 32
LR = 3e-3
VALID_FRACTION = 0.1


class UsageError(Exception):
    """A bad combination of arguments that only the demo can see; the CLI reports it as usage."""


def memory_needed(H: int, B: int, T: int, vocab: int) -> int:
    """A lower bound on the bytes the demo needs (fp32): both models' weights, gradients and
    Adam's two moments, and one step's activations (LSTM gates and states, logits, their grads)."""
    params = 4 * H * (EMBED + H) + 8 * H + vocab * EMBED + vocab * (H + 1)
    return 4 * (2 * 4 * params + B * T * (6 * H + 2 * vocab + EMBED))


def memory_total(device: torch.device) -> Optional[int]:
    """The device's memory in bytes (the GPU's, or the machine's RAM), None where unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


def load_text() -> str:
    return resources.files("fused_rnn").joinpath("data", TEXT).read_text(encoding="utf-8")


class CharLM(nn.Module):
    """Embedding -> one LSTM layer (batch_first) -> Linear over the characters."""

    def __init__(self, vocab: int, hidden: int, rnn: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(vocab, EMBED)
        self.rnn = rnn
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx, state=None):
        out, state = self.rnn(self.embed(idx), state)
        return self.head(out), state


class Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal, else a line per 10%."""

    def __init__(self, total: int, label: str, stream: Optional[TextIO] = None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.next_pct = 10

    def update(self, done: int, loss: float, tok_s: float) -> None:
        now = time.perf_counter()
        final = done == self.total
        pct = 100 * done // self.total
        if self.tty:
            if not final and now - self.last_draw < 0.1:
                return
        elif not final and pct < self.next_pct:
            return
        self.last_draw = now
        self.next_pct = (pct // 10 + 1) * 10
        fill = self.width * done // self.total
        bar = "#" * fill + "." * (self.width - fill)
        elapsed = now - self.t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = (f"{self.label} [{bar}] {done}/{self.total} loss {loss:.3f} "
                f"{tok_s:,.0f} tok/s {elapsed:.0f}s" + ("" if final else f" eta {eta:.0f}s"))
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(data: torch.Tensor, batch: int, seq: int, g: torch.Generator):
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
    idx = starts.unsqueeze(1) + torch.arange(seq + 1).unsqueeze(0)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


def train(model: CharLM, data: torch.Tensor, steps: int, batch: int, seq: int, seed: int,
          device: torch.device, label: str) -> Dict:
    """Adam on random windows of ``data``; the batches depend on ``seed`` only."""
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    vocab = model.head.out_features
    warmup = 1 if steps > 1 else 0  # the first step (allocations, kernel compiles) is not timed
    losses: List[float] = []
    bar = Progress(steps, label)
    t_start = None
    for step in range(steps):
        if step == warmup:
            _sync(device)
            t_start = time.perf_counter()
        x, y = _batch(data, batch, seq, g)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())  # a sync each step, the same for both models
        timed = step + 1 - warmup
        tok_s = timed * batch * seq / (time.perf_counter() - t_start) if t_start and timed else 0.0
        bar.update(step + 1, losses[-1], tok_s)
    _sync(device)
    seconds = time.perf_counter() - (t_start if t_start is not None else time.perf_counter())
    timed_steps = steps - warmup
    return {
        "losses": losses,
        "warmup_steps": warmup,
        "timed_steps": timed_steps,
        "seconds": seconds,
        "tokens_per_s": timed_steps * batch * seq / seconds if timed_steps and seconds > 0 else 0.0,
    }


@torch.no_grad()
def evaluate(model: CharLM, data: torch.Tensor, batch: int, seq: int, device: torch.device,
             batches: int = 4) -> float:
    g = torch.Generator().manual_seed(1234)
    vocab = model.head.out_features
    total = 0.0
    for _ in range(batches):
        x, y = _batch(data, batch, seq, g)
        logits, _ = model(x.to(device))
        total += F.cross_entropy(logits.reshape(-1, vocab), y.to(device).reshape(-1)).item()
    return total / batches


@torch.no_grad()
def sample(model: CharLM, stoi: Dict[str, int], itos: List[str], device: torch.device,
           prime: str = "MACBETH.\n", n: int = 200, temperature: float = 0.8, seed: int = 0) -> str:
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.tensor([[stoi[c] for c in prime]], device=device)
    logits, state = model(idx)
    out = []
    for _ in range(n):
        probs = F.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=g))
        out.append(itos[nxt])
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return prime + "".join(out)


def _plot(path: str, runs: Dict[str, Dict], labels: Dict[str, str], title: str) -> Optional[str]:
    """The loss curves as a PNG; returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # matplotlib is optional (the `bench` extra)
        return f"matplotlib is not importable ({type(e).__name__}: {e})"
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, run), style in zip(runs.items(), ("-", "--", ":")):
        ax.plot(range(1, len(run["losses"]) + 1), run["losses"], style, lw=1.2,
                label=f"{name} [{labels[name]}]: {run['tokens_per_s']:,.0f} tok/s")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / char)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(args, device: torch.device, out: Optional[TextIO] = None) -> int:
    """Run the demo from the parsed `fused-rnn demo` arguments (checked by fused_rnn.cli, which
    also resolved ``device``); returns the exit status."""
    out = out or sys.stdout
    cfg = dict(QUICK if args.quick else FULL)
    for k in ("steps", "hidden_size", "batch_size", "seq_len"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)

    import fused_rnn
    from ._backend import aten_route, resolve_backend

    text = load_text()
    itos = sorted(set(text))
    stoi = {c: i for i, c in enumerate(itos)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_valid = int(len(data) * VALID_FRACTION)
    train_data, valid_data = data[:-n_valid], data[-n_valid:]
    if valid_data.numel() <= cfg["seq_len"] + 1:
        raise UsageError(f"--seq-len {cfg['seq_len']}: at most {valid_data.numel() - 2} (the "
                         f"held-out part of the text is {valid_data.numel():,} characters)")

    H, B, T, steps = cfg["hidden_size"], cfg["batch_size"], cfg["seq_len"], cfg["steps"]
    need, have = memory_needed(H, B, T, len(itos)), memory_total(device)
    if have is not None and need > have:  # refuse up front, not in an allocator's traceback
        raise UsageError(f"--hidden-size {H}, --batch-size {B}, --seq-len {T}: the two models "
                         f"need at least {need / 2**30:,.1f} GiB and {device} has "
                         f"{have / 2**30:,.1f} GiB")
    if args.threads is not None or device.type == "cpu":
        # One thread by default on the CPU: the small per-step matmuls gain nothing from more,
        # and on a busy 2-core machine two threads ran the reference path ~14x slower.
        torch.set_num_threads(args.threads or 1)
    probe = torch.empty(0, device=device)
    ran = resolve_backend(args.backend, probe)
    cpu_route = ran == "reference" and aten_route(args.backend, probe)
    ln_ran = ran
    if cpu_route:
        ran, ln_ran = "ATen (CPU route)", "whole-sequence (CPU route)"
        what = "torch's ATen LSTM op with the layer's weights, as torch.nn runs it"
    elif ran == "triton":
        what = "Triton kernels" + (", through the interpreter" if device.type == "cpu" else "")
    else:
        what = "reference path: a PyTorch time loop, not the Triton kernels"
    fused_desc = f"fused_rnn.LSTM backend={args.backend} -> {ran} ({what}) on {device}"
    if device.type == "cuda":
        on_off = {True: "on", False: "off"}
        if ran == "triton":  # the kernels follow torch's cuBLAS TF32 switch for fp32
            fused_desc += f", TF32 {on_off[bool(torch.backends.cuda.matmul.allow_tf32)]}"
        torch_desc = (f"torch.nn.LSTM on {device} (cuDNN {torch.backends.cudnn.version()}, "
                      f"TF32 {on_off[bool(torch.backends.cudnn.allow_tf32)]})")
    else:
        torch_desc = f"torch.nn.LSTM on {device} (ATen CPU kernels)"
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out}: {e}") from None

    # One set of initial weights, made once from the seed and loaded into both models.
    torch.manual_seed(args.seed)
    ref_model = CharLM(len(itos), H, nn.LSTM(EMBED, H, batch_first=True)).to(device)
    fused_model = CharLM(len(itos), H, fused_rnn.LSTM(EMBED, H, batch_first=True,
                                                      backend=args.backend)).to(device)
    fused_model.load_state_dict(ref_model.state_dict())
    ln_model = CharLM(len(itos), H, fused_rnn.LSTM(EMBED, H, batch_first=True, layer_norm=True,
                                                   backend=args.backend)).to(device)
    ln_model.load_state_dict(ref_model.state_dict(), strict=False)  # + LayerNorm's 1 / 0 init
    n_params = sum(p.numel() for p in ref_model.parameters())

    print(f"fused-rnn demo: char-level LSTM language model on {TEXT} "
          f"({len(text):,} chars, {len(itos)} symbols; {len(valid_data):,} held out)", file=out)
    print(f"model: embedding {EMBED} -> LSTM hidden {H} -> linear {len(itos)} "
          f"({n_params:,} parameters); batch {B} x {T} chars, {steps} step{'s' * (steps != 1)}, "
          f"Adam lr {LR}, seed {args.seed}", file=out)
    print(f"fused:  {fused_desc}", file=out)
    print(f"torch:  {torch_desc}", file=out)
    threads = f"; {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    print(f"same initial weights (load_state_dict) and the same batches for both{threads}; "
          f"torch {torch.__version__}, fused_rnn {fused_rnn.__version__}", file=out, flush=True)

    runs = {}
    runs["fused_rnn.LSTM"] = train(fused_model, train_data, steps, B, T, args.seed, device,
                                   "fused_rnn.LSTM")
    runs["torch.nn.LSTM"] = train(ref_model, train_data, steps, B, T, args.seed, device,
                                  "torch.nn.LSTM ")
    runs[LN_NAME] = train(ln_model, train_data, steps, B, T, args.seed, device, LN_NAME)
    for name, model in (("fused_rnn.LSTM", fused_model), ("torch.nn.LSTM", ref_model), (LN_NAME, ln_model)):
        model.eval()
        runs[name]["valid_loss"] = evaluate(model, valid_data, B, T, device)

    f, r = runs["fused_rnn.LSTM"], runs["torch.nn.LSTM"]
    first_diff = abs(f["losses"][0] - r["losses"][0])
    print(file=out)
    print(f"{'model':<17} {'what ran':<44} {'first loss':>10} {'last loss':>9} "
          f"{'held-out':>8} {'tokens/s':>10}", file=out)
    for name, desc in (("fused_rnn.LSTM", f"{ran} on {device}"),
                       ("torch.nn.LSTM", ("cuDNN" if device.type == "cuda" else "ATen")
                        + f" on {device}"),
                       (LN_NAME, f"{ln_ran} on {device}")):
        run = runs[name]
        print(f"{name:<17} {desc:<44} {run['losses'][0]:>10.4f} {run['losses'][-1]:>9.4f} "
              f"{run['valid_loss']:>8.4f} {run['tokens_per_s']:>10,.0f}", file=out)
    speedup = f["tokens_per_s"] / r["tokens_per_s"] if r["tokens_per_s"] else math.nan
    timed = f"{f['timed_steps']} timed step" + ("s" if f["timed_steps"] != 1 else "")
    timed += " after 1 warm-up step" if f["warmup_steps"] else " (no warm-up step)"
    print(f"speed: fused_rnn / torch.nn = {speedup:.2f}x in tokens/s (training: forward, backward "
          f"and Adam; {timed})", file=out)
    ln_tok = runs[LN_NAME]["tokens_per_s"]
    print(f"layer norm: {LN_NAME} takes {r['tokens_per_s'] / ln_tok if ln_tok else math.nan:.2f}x "
          f"torch.nn.LSTM's time per token (torch.nn has no layer-norm LSTM)", file=out)
    if cpu_route:
        print("note: on the CPU fused_rnn (auto) runs torch's own ATen op for the plain LSTM, so the two "
              "should be within noise; the layer-norm LSTM runs fused_rnn's whole-sequence CPU route. "
              "Neither is the Triton kernels' speed", file=out)
    elif ran == "reference":
        print("note: fused_rnn ran its reference path (a Python loop over time steps), not the "
              "Triton kernels; its speed here is not the kernels' speed", file=out)
    elif device.type == "cpu":
        print("note: fused_rnn ran the Triton kernels through the interpreter (numpy on the CPU); "
              "its speed here is not the kernels' speed", file=out)
    max_diff = max(abs(a - b) for a, b in zip(f["losses"], r["losses"]))
    print(f"agreement: training losses differ by {first_diff:.1e} at step 1 and by at most "
          f"{max_diff:.1e} over {steps} steps (same weights, same batches)", file=out)

    png = os.path.join(args.out, "loss.png")
    title = (f"character-level LSTM on {TEXT}: hidden {H}, batch {B} x {T} chars, on {device}\n"
             "same initial weights and batches; tokens/s of training (fwd + bwd + Adam)")
    labels = {"fused_rnn.LSTM": f"backend {args.backend} -> {ran}",
              "torch.nn.LSTM": "cuDNN" if device.type == "cuda" else "ATen CPU",
              LN_NAME: f"layer norm: {ln_ran}"}
    why_not = _plot(png, runs, labels, title)
    print(f"loss curve: {png}" if why_not is None else f"loss curve: not plotted: {why_not}",
          file=out)
    text_sample = sample(fused_model, stoi, itos, device, seed=args.seed)
    result = {
        "text": TEXT,
        "device": str(device),
        "fused": {"class": "fused_rnn.LSTM", "backend": args.backend, "ran": ran,
                  "description": fused_desc},
        "torch": {"class": "torch.nn.LSTM", "description": torch_desc},
        "config": dict(cfg, embed=EMBED, lr=LR, seed=args.seed, vocab=len(itos),
                       threads=torch.get_num_threads() if device.type == "cpu" else None),
        "versions": {"fused_rnn": fused_rnn.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "runs": runs,
        "sample": text_sample,
    }
    js = os.path.join(args.out, "results.json")
    with open(js, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"results: {js}", file=out)
    print("\nsample from fused_rnn.LSTM (temperature 0.8):", file=out)
    print(text_sample, file=out, flush=True)
    return 0
