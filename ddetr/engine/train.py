"""The training loop: AdamW with a smaller backbone learning rate and a step drop,
gradient clipping, mixed precision on CUDA, DDP through torchrun, COCO evaluation,
a JSON-lines log and atomic checkpoints that ``resume`` continues exactly.

    from ddetr.config import get_config
    from ddetr.engine import train
    run = train(get_config("cpu", {"epochs": 2}))
    run["history"][-1]["coco"]["AP"]

Files in cfg.output_dir: ``checkpoint.pth`` (after every epoch), ``log.jsonl`` (one
line per epoch: losses, learning rate, throughput, COCO metrics when evaluated).
"""
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm import tqdm

from ..config import config_to_dict
from ..data import build_dataset, collate, ensure_data
from . import distributed as dist
from .checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .evaluate import evaluate, format_table
from .precision import autocast, needs_grad_scaler


# --- pieces ------------------------------------------------------------------------
def resolve_device(name):
    """"auto" -> cuda when available, else cpu; cuda under torchrun -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    if name == "cuda":
        import os
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def param_groups(model, cfg):
    """Three groups as in the official code: the rest at cfg.lr, the backbone at
    cfg.lr_backbone, sampling offsets and reference points at lr * lr_linear_proj_mult."""
    rest, backbone, proj = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "backbone." in name:
            backbone.append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            proj.append(p)
        else:
            rest.append(p)
    groups = [{"params": rest, "lr": cfg.lr},
              {"params": backbone, "lr": cfg.lr_backbone},
              {"params": proj, "lr": cfg.lr * cfg.lr_linear_proj_mult}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, cfg):
    """AdamW over param_groups and a StepLR that divides the rates by 10 at cfg.lr_drop."""
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop)
    return optimizer, scheduler


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, ... in order: each image evaluated exactly once."""

    def __init__(self, n, rank=0, world=1):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loaders(cfg, rank=0, world=1):
    """(train dataset, train loader, val dataset, val loader). The training order is
    a function of (cfg.seed, epoch) only -- call loader.batch_sampler.sampler.set_epoch."""
    if dist.is_main_process():            # one process prepares the data, the others wait
        ensure_data(cfg)
    dist.barrier()
    train_set, val_set = build_dataset("train", cfg), build_dataset("val", cfg)
    if len(train_set) < cfg.batch_size * world:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch "
                         f"({cfg.batch_size} per process x {world} processes)")
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed)
    train_loader = DataLoader(train_set, batch_sampler=BatchSampler(sampler, cfg.batch_size,
                                                                    drop_last=True),
                              collate_fn=collate, num_workers=cfg.num_workers)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size,
                            sampler=ShardSampler(len(val_set), rank, world),
                            collate_fn=collate, num_workers=cfg.num_workers)
    return train_set, train_loader, val_set, val_loader


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- one epoch ---------------------------------------------------------------------
def train_one_epoch(model, criterion, loader, optimizer, device, epoch, cfg, scaler=None,
                    progress=True, deadline=None):
    """One pass over loader (or cfg.iters_per_epoch batches, or until the
    time.perf_counter() deadline). Returns a dict of the epoch's mean losses (weighted
    total "loss" and every unweighted term), averaged over processes, plus
    "images_per_s" (all processes together), "iterations" and "loss_per_iter" (the
    total loss of every iteration, this process)."""
    model.train()
    criterion.train()
    weights = criterion.weight_dict
    n_iters = len(loader)
    if cfg.iters_per_epoch > 0:
        n_iters = min(n_iters, cfg.iters_per_epoch)
    sums, count, images, per_iter = {}, 0, 0, []
    bar = tqdm(total=n_iters, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
               disable=not progress or not dist.is_main_process(),
               mininterval=2 if progress is True else float(progress or 2),
               dynamic_ncols=False, ncols=100)
    start = time.perf_counter()
    for it, (imgs, masks, targets) in enumerate(loader):
        if it >= n_iters or (it > 0 and _past(deadline)):   # at least one step
            break
        imgs, masks = imgs.to(device, non_blocking=True), masks.to(device)
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                   for t in targets]
        with autocast(device, cfg.amp):
            outputs = model(imgs, masks)
        outputs = _to_float(outputs)
        loss_dict = criterion(outputs, targets)
        loss = sum(loss_dict[k] * weights[k] for k in weights if k in loss_dict)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}, "
                                     f"iteration {it}: {_floats(loss_dict)}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        if scaler is not None and scaler.is_enabled():
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        for k, v in {"loss": loss, **loss_dict}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        count += 1
        images += imgs.shape[0]
        per_iter.append(round(float(loss.detach()), 4))
        rate = images * dist.get_world_size() / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", img_s=f"{rate:.1f}",
                        refresh=False)
        bar.update()
    bar.close()
    elapsed = time.perf_counter() - start
    means = dist.reduce_mean({k: v / max(count, 1) for k, v in sums.items()})
    means["images_per_s"] = images * dist.get_world_size() / max(elapsed, 1e-9)
    means["iterations"] = count
    means["loss_per_iter"] = per_iter
    return means


def _past(deadline):
    """Whether every process is past the deadline (they must stop together)."""
    if deadline is None:
        return False
    late = float(time.perf_counter() > deadline)
    return dist.reduce_mean({"late": late})["late"] > 0


def _to_float(outputs):
    """Autocast outputs back to float32 for the loss (a no-op without AMP)."""
    if torch.is_tensor(outputs):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs


def _floats(d):
    return {k: round(float(v), 4) for k, v in d.items()}


# --- the run -----------------------------------------------------------------------
def train(cfg, resume=None, progress=True):
    """Train cfg's model on cfg's data; evaluate every cfg.eval_every epochs and at the end.

    Args:
        cfg: a ddetr.config.Config.
        resume: None; True for cfg.output_dir/checkpoint.pth; or a checkpoint path;
            "auto" resumes when cfg.output_dir/checkpoint.pth exists (a finished run
            then just returns its results).
            The run continues with the checkpoint's model, optimizer, scheduler, scaler,
            RNG states and epoch (cfg.epochs may be raised to train longer).
        progress: show tqdm progress bars (stderr); a number sets the seconds between
            their updates (e.g. 30 in a notebook that is rendered as a page).
    Returns:
        dict: "history" (one dict per epoch, as in log.jsonl), "stats" (the last COCO
        evaluation), "model" (unwrapped), "criterion", "postprocessor", "checkpoint".
    """
    from ..models import build_model

    device = resolve_device(cfg.device)
    rank, world = dist.init_distributed(device)
    out_dir = Path(cfg.output_dir)
    ckpt_path = out_dir / "checkpoint.pth"
    log_path = out_dir / "log.jsonl"
    if dist.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(f".{ckpt_path.name}.*.tmp"):   # left by a killed save
            stale.unlink()

    seed_everything(cfg.seed)                       # same initial weights on every rank
    model, criterion, postprocessor = build_model(cfg)
    model.to(device)
    criterion.to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))
    seed_everything(cfg.seed + rank)                # different augmentations per rank
    train_set, train_loader, val_set, val_loader = build_loaders(cfg, rank, world)

    start_epoch, history = 0, []
    if resume == "auto":
        resume = True if ckpt_path.is_file() else None
    if resume:
        path = ckpt_path if resume is True else Path(resume)
        state = load_checkpoint(path)
        _check_same_model(state.get("config", {}), cfg, path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state.get("history", [])
        rng = state["rng"]
        if len(rng) != world:
            raise ValueError(f"checkpoint {path} was written by {len(rng)} processes, "
                             f"this run has {world}; RNG states cannot be matched")
        set_rng_state(rng[rank])
        if dist.is_main_process():                  # drop log lines past the checkpoint
            _write_log(log_path, history)
    elif dist.is_main_process():
        _write_log(log_path, [])

    ddp_model = model
    if world > 1:
        if device.type == "cuda":     # batch statistics over all GPUs' images (CPU: none)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)
    writer = _tensorboard(cfg, out_dir) if dist.is_main_process() else None
    categories = {c["id"]: c["name"] for c in train_set.coco.dataset.get("categories", [])}

    stats = history[-1].get("coco") if history else None
    deadline = None
    if cfg.time_limit_min > 0:
        spent = sum(r["time_s"] for r in history)
        deadline = time.perf_counter() + cfg.time_limit_min * 60 - spent
    if history and history[-1].get("time_limited"):
        start_epoch = cfg.epochs                    # a time-limited run is finished
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.batch_sampler.sampler.set_epoch(epoch)
        t0, c0 = time.perf_counter(), time.process_time()
        losses = train_one_epoch(ddp_model, criterion, train_loader, optimizer, device,
                                 epoch, cfg, scaler, progress, deadline)
        dist.average_buffers(model)           # the same batch-norm statistics everywhere
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = {"epoch": epoch + 1, "lr": lr, "train_time_s": time.perf_counter() - t0,
                  "train_cpu_s": time.process_time() - c0,   # this process, all threads
                  **{f"train_{k}": v for k, v in losses.items()}}
        out_of_time = _past(deadline)
        if out_of_time:
            record["time_limited"] = True
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or out_of_time:
            result = evaluate(model, postprocessor, val_loader, val_set.coco, device,
                              progress, cfg.amp)
            stats = {k: v for k, v in result.items() if k != "summary"}
            record["coco"] = stats
            if progress and dist.is_main_process():
                print(f"epoch {epoch + 1}: loss {losses['loss']:.3f}, "
                      f"{losses['images_per_s']:.1f} img/s\n{format_table(stats)}",
                      flush=True)
        record["time_s"] = time.perf_counter() - t0
        history.append(record)
        rng = dist.all_gather_object(get_rng_state())
        if dist.is_main_process():
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "lr_scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "epoch": epoch + 1,
                             "rng": rng, "history": history,
                             "config": config_to_dict(cfg), "categories": categories},
                            ckpt_path)
            _append_log(log_path, record)
            if writer is not None:
                _log_tensorboard(writer, record)
        dist.barrier()
        if out_of_time:
            if progress and dist.is_main_process():
                print(f"stopped at the time limit of {cfg.time_limit_min} min "
                      f"(epoch {epoch + 1}, {losses['iterations']} iterations)")
            break
    if writer is not None:
        writer.close()
    return {"history": history, "stats": stats, "model": model, "criterion": criterion,
            "postprocessor": postprocessor, "checkpoint": ckpt_path,
            "categories": categories}


MODEL_KEYS = ("architecture", "backbone", "backbone_norm", "dilation", "num_feature_levels",
              "d_model", "n_heads", "enc_layers", "dec_layers", "dim_feedforward",
              "enc_n_points", "dec_n_points", "num_queries", "num_classes",
              "with_box_refine", "two_stage", "query_anchors")


def _check_same_model(saved, cfg, path):
    """A checkpoint resumes only the model it was written for: name the keys that differ."""
    differ = {k: (saved[k], getattr(cfg, k)) for k in MODEL_KEYS
              if k in saved and saved[k] != getattr(cfg, k)}
    if differ:
        listed = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now"
                           for k, (a, b) in differ.items())
        raise ValueError(f"checkpoint {path} holds another model ({listed}); resume it "
                         f"with its own settings, or train into another output_dir")


def _write_log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _append_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path):
    """The records of a log.jsonl, as a list of dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _tensorboard(cfg, out_dir):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("tensorboard=true needs the tensorboard package "
                          "(pip install tensorboard)") from e
    return SummaryWriter(str(out_dir / "tensorboard"))


def _log_tensorboard(writer, record):
    step = record["epoch"]
    for k, v in record.items():
        if k.startswith("train_") and isinstance(v, (int, float)):
            writer.add_scalar(f"train/{k[6:]}", v, step)
    for k, v in (record.get("coco") or {}).items():
        if v is not None:                        # None: not measured (no such objects)
            writer.add_scalar(f"val/{k}", v, step)
    writer.add_scalar("lr", record["lr"], step)
