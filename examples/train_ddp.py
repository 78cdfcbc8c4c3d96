"""Train a character-level language model with fused_rnn layers on several processes.

    torchrun --nproc-per-node 2 examples/train_ddp.py                 # CPU: gloo
    torchrun --nproc-per-node 8 examples/train_ddp.py --layer-norm    # one process per GPU: NCCL
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT --nproc-per-node 8 examples/train_ddp.py

Each process takes its own slice of every global batch (the batch is split across processes, so
the result does not depend on their number), DistributedDataParallel averages the gradients,
and rank 0 prints the loss and saves checkpoints (model and optimizer state_dicts) that
``--resume`` continues exactly: each step's batch comes from a generator seeded with the step.
The text is Macbeth, shipped with fused_rnn (fused_rnn/data).
"""
import argparse
import os
import time
from importlib import resources

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_rnn


class CharLM(nn.Module):
    def __init__(self, vocab, hidden, layers, layer_norm):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = fused_rnn.LSTM(32, hidden, num_layers=layers, batch_first=True, layer_norm=layer_norm)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def batch(data, step, size, seq_len, rank, world):
    """This process's rows of global batch ``step``: windows of ``data`` drawn from a generator
    seeded with the step, so a resumed run sees the batches an unbroken one would."""
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(data) - seq_len - 1, (size,), generator=g)[rank::world]
    windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="global: split over the processes")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--layer-norm", action="store_true")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--checkpoint", default="train_ddp.pt",
                   help="where rank 0 saves, at the end and every --save-every steps; '{step}' in it is the step")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", metavar="PATH", help="a checkpoint to continue from")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {world} processes")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    text = resources.files("fused_rnn").joinpath("data", "macbeth.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)

    config = dict(hidden=args.hidden, layers=args.layers, layer_norm=args.layer_norm)
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = DDP(CharLM(len(chars), args.hidden, args.layers, args.layer_norm).to(device),
                device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step = 0
    if args.resume:
        state = torch.load(args.resume, map_location=device)
        if state["config"] != config:
            raise SystemExit(f"{args.resume} holds a model {state['config']}, not {config}")
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]

    t0, tokens = time.perf_counter(), 0
    last = step + args.steps
    for step in range(step + 1, last + 1):
        x, y = (t.to(device) for t in batch(data, step, args.batch_size, args.seq_len, rank, world))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += x.numel() * world
        if rank == 0 and (step % args.log_every == 0 or step == 1):  # rank 0's own rows' loss
            print(f"step {step:5d}  loss {loss.item():.4f}  {tokens / (time.perf_counter() - t0):,.0f} tokens/s",
                  flush=True)
        if rank == 0 and (step == last or args.save_every and step % args.save_every == 0):
            path = args.checkpoint.format(step=step)
            torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "step": step, "config": config},
                       path)
            print(f"saved {path}", flush=True)
    dist.barrier()  # no process tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
