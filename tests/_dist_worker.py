"""The processes tests/test_distributed.py spawns: each joins a gloo group, trains the models of
``models()`` on its half of every batch under DDP or FSDP2, and saves what the parent compares
with one process training on the whole batch."""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fused_rnn

T, B, I, H, P = 5, 4, 3, 4, 3  # B splits into two halves, one per process
STEPS = 3
LR = 0.1


def models(backend):
    """name -> a fresh model (fp64, weights from torch's current seed)."""
    return {
        "lstm_ln": lambda: fused_rnn.LSTM(I, H, layer_norm=True, backend=backend),
        "lstm_proj": lambda: fused_rnn.LSTM(I, H, proj_size=P, backend=backend),
        "rnn": lambda: fused_rnn.RNN(I, H, backend=backend),
        "gru": lambda: fused_rnn.GRU(I, H, backend=backend),
        "lstm_2l_bidir": lambda: fused_rnn.LSTM(I, H, num_layers=2, bidirectional=True, backend=backend),
    }


def make(name, backend, seed=0):
    torch.manual_seed(seed)
    return models(backend)[name]().double()


def batches():
    """STEPS batches of (x [T, B, I], target like the output), the same in every process."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS + 1):
        x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
        out.append((x, torch.randn(T, B, 2 * H, generator=g, dtype=torch.float64)))
    return out


def loss_of(model, x, target):
    """Mean over every element, so the mean of two halves' losses is the whole batch's."""
    out, _ = model(x)
    return (out * target[..., : out.shape[-1]]).mean()


def train_step(model, opt, x, target):
    opt.zero_grad()
    loss = loss_of(model, x, target)
    loss.backward()
    opt.step()
    return loss.detach()


def full(t):
    """A DTensor's whole value (FSDP2 shards parameters), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def single_process(name, backend):
    """What the parent compares with: one process, the whole batch. -> (grads after step 1,
    parameters after STEPS steps)."""
    model = make(name, backend)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads = None
    for x, target in batches()[:STEPS]:
        train_step(model, opt, x, target)
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, {n: p.detach().clone() for n, p in model.state_dict().items()}


def _half(rank):
    """This process's rows of every batch."""
    return slice(rank * B // 2, (rank + 1) * B // 2)


def _run(model, opt, rank, shard):
    grads = None
    for x, target in batches()[:STEPS]:
        half = _half(rank)
        train_step(model, opt, x[:, half], target[:, half])
        if grads is None:
            grads = {n: full(p.grad).clone() for n, p in shard.named_parameters()}
    return grads, {n: full(p).detach().clone() for n, p in shard.state_dict().items()}


def _checkpoint(name, backend, rank, out_dir):
    """Train STEPS steps, save model and optimizer (rank 0), take one more step; then a fresh
    model and optimizer load the files and take that step: the loss and weights must agree."""
    model = DDP(make(name, backend))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    _run(model, opt, rank, model.module)
    path = os.path.join(out_dir, f"ckpt_{name}.pt")
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    x, target = batches()[STEPS]
    half = _half(rank)
    cont = train_step(model, opt, x[:, half], target[:, half])

    fresh = DDP(make(name, backend, seed=123))
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=LR, momentum=0.9)
    state = torch.load(path)
    fresh.module.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["opt"])
    resumed = train_step(fresh, fresh_opt, x[:, half], target[:, half])
    same_weights = all(torch.equal(a, b) for a, b in zip(model.module.state_dict().values(),
                                                          fresh.module.state_dict().values()))
    return {"continued": cont, "resumed": resumed, "same_weights": same_weights}


def worker(rank, world, port, backend, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        res = {}
        for name in models(backend):
            ddp = DDP(make(name, backend))
            res[("ddp", name)] = _run(ddp, torch.optim.SGD(ddp.parameters(), lr=LR), rank, ddp.module)
            shard = make(name, backend)
            fully_shard(shard)
            res[("fsdp2", name)] = _run(shard, torch.optim.SGD(shard.parameters(), lr=LR), rank, shard)
        res[("checkpoint", "lstm_ln")] = _checkpoint("lstm_ln", backend, rank, out_dir)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no process tears the group down while another still uses it
    finally:
        dist.destroy_process_group()
