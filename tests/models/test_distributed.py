"""pykernels.models under torch.distributed on CPU (gloo, 2 processes on 127.0.0.1): each
rank trains on half the batch; after one backward the gradients equal a single process's on
the full batch (mean losses over equal halves average to the full mean). DDP always; FSDP2
(torch.distributed.fsdp.fully_shard) where this torch runs it on CPU with gloo, which a
plain torch.nn model probes first, so that a skip names what torch itself could not do.

One spawn runs every case: starting the processes costs more than the tiny models."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_checks import assert_same_grads, grads

import pykernels
from pykernels import models

WORLD = 2
DT = torch.float64


def build(name):
    torch.manual_seed(0)
    if name == "MLP":
        return models.MLP(10, [16, 16], 4, activation="gelu").to(DT)
    return models.Transformer(13, 16, 2, 2, 8).to(DT)


def full_batch(name):
    g = torch.Generator().manual_seed(1)
    if name == "MLP":
        x = torch.randn(8, 10, generator=g, dtype=DT)
        return x, torch.randint(0, 4, (8,), generator=g)
    idx = torch.randint(0, 13, (4, 8), generator=g)
    return idx, torch.randint(0, 13, (4, 8), generator=g)


def half_batch(name, rank):
    return tuple(t.chunk(WORLD)[rank] for t in full_batch(name))


def step(model, inputs):
    """One forward + backward; the loss."""
    loss = model(*inputs)[1]
    loss.backward()
    return loss.detach()


def fsdp_probe():
    """None if fully_shard trains a plain torch.nn.Linear on this torch/CPU/gloo, else why."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        probe = fully_shard(torch.nn.Linear(4, 4).to(DT), mesh=mesh)
        probe(torch.randn(2, 4, dtype=DT)).sum().backward()
        probe.weight.grad.full_tensor()
        return None
    except Exception as error:  # the reason the test reports, whatever torch raised
        return f"{type(error).__name__}: {error}".splitlines()[0]


def fsdp_grads(name, rank):
    """Gradients (full tensors) of ``name`` sharded by fully_shard per block and at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = build(name)
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    step(model, half_batch(name, rank))
    return {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    try:  # an exception reaches the test through mp.spawn, with its traceback
        with pykernels.use_backend("cpu"):
            for name in ("MLP", "Transformer"):
                model = torch.nn.parallel.DistributedDataParallel(build(name))
                step(model, half_batch(name, rank))
                results[f"ddp {name}"] = grads(model.module)
            results["fsdp skip"] = fsdp_probe()
            if results["fsdp skip"] is None:
                for name in ("MLP", "Transformer"):
                    results[f"fsdp {name}"] = fsdp_grads(name, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process_grads(name):
    with pykernels.use_backend("cpu"):
        model = build(name)
        step(model, full_batch(name))
    return grads(model)


@pytest.mark.parametrize("name", ["MLP", "Transformer"])
def test_ddp_matches_single_process(ranks, name):
    expected = single_process_grads(name)
    for rank in ranks:
        assert_same_grads(rank[f"ddp {name}"], expected)


@pytest.mark.parametrize("name", ["MLP", "Transformer"])
def test_fsdp2_matches_single_process(ranks, name):
    reasons = {r["fsdp skip"] for r in ranks} - {None}
    if reasons:
        pytest.skip(f"fully_shard does not run on CPU/gloo here: {'; '.join(reasons)}")
    expected = single_process_grads(name)
    for rank in ranks:
        assert_same_grads(rank[f"fsdp {name}"], expected)
