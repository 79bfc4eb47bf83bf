"""Distributed data parallel helpers: one process per device, started by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op
for a single process. The backend is gloo on CPU and nccl on CUDA.

    python -m torch.distributed.run --nproc_per_node 2 -m ddetr train --config cpu
"""
import os

import torch
import torch.distributed as dist


def init_distributed(device):
    """Join the process group if torchrun started us. Returns (rank, world_size).

    device: the torch.device this process will use; "cuda" picks cuda:LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main_process():
    return get_rank() == 0


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_mean(values):
    """dict name -> float, averaged over processes."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: v / get_world_size() for k, v in zip(keys, t.tolist())}


def average_buffers(model):
    """Average every floating-point buffer (batch-norm running statistics) over processes.

    Parameters stay identical under DDP, but a trainable batch norm updates its running
    statistics from each process's own batches; averaging them after an epoch makes
    every process evaluate and save the same model, with statistics of all the data.
    """
    if not is_distributed():
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(get_world_size())


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup():
    if is_distributed():
        dist.destroy_process_group()
