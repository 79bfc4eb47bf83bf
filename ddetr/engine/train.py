"""The training loop: AdamW with a smaller backbone learning rate and a step drop
placed on progress through the run's budget (ddetr.engine.schedule), a CPU thread count
tuned while it trains (ddetr.engine.threads), gradient clipping, mixed precision on CUDA, DDP through torchrun, COCO evaluation,
a JSON-lines log and atomic checkpoints that ``resume`` continues exactly.

    from ddetr.config import get_config
    from ddetr.engine import train
    run = train(get_config("cpu", {"epochs": 2}))
    run["history"][-1]["coco"]["AP"]

Files in cfg.output_dir (ddetr.engine.run_folder): ``checkpoint.pth`` (after every
epoch), ``log.jsonl`` (one line per epoch, never truncated: losses, learning rate,
throughput, COCO metrics when evaluated) and ``.lock``, held while a run trains.
A loss, a model output or a weight that is not finite stops the run (TrainingDiverged),
leaving the last good checkpoint as it was.
"""
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm import tqdm

from ..data import build_dataset, collate, ensure_data
from ..models import build_model
from ..ops.kernel import KernelUnavailableError
from ..ops.ms_deform_attn import check_backend
from . import distributed as dist
from .checkpoint import (CheckpointError, config_record, get_rng_state, load_checkpoint,
                         load_state_dict_strict, resume_changes, save_checkpoint,
                         set_rng_state)
from .evaluate import evaluate, format_table
from .precision import autocast, needs_grad_scaler
from .run_folder import (CHECKPOINT_NAME, append_log, lock_run_folder,
                         refuse_previous_run, remove_stale_temporaries, start_log)
from .schedule import Schedule, set_base_rates
from .threads import ThreadTuner


class TrainingDiverged(FloatingPointError, ValueError):
    """A loss, a model output or a weight became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says where and which checkpoint is kept."""


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
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def check_attention_backend(cfg, device):
    """Refuse cfg.attention_backend where it cannot run (e.g. triton on a CPU without
    Triton's interpreter), before any data is made or model built."""
    try:
        check_backend(cfg.attention_backend, device, cfg.num_feature_levels)
    except (KernelUnavailableError, ImportError) as e:
        raise ValueError(f"config key 'attention_backend': {cfg.attention_backend!r} cannot "
                         f"run on {device}: {e}") from e


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


def prepare_model(model, device):
    """The model on `device`, its backbone in the channels_last memory format on a CPU:
    oneDNN's convolutions work in it, so the backbone's activations and gradients are
    not reordered at every layer (benchmarks/train_step.md, "issue 32's step")."""
    model = model.to(device)
    if device.type == "cpu":
        model.backbone.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model, cfg):
    """AdamW over param_groups, each group's base rate kept as its "initial_lr" (the
    rate ddetr.engine.schedule.Schedule multiplies)."""
    groups = param_groups(model, cfg)
    # the fused AdamW: one kernel for all parameters instead of several per tensor (the
    # same update and state): 7 ms of a 57 ms step on an H200 before; on a CPU torch's
    # default is a Python loop over the tensors, 5x slower for the cpu preset's 398
    # (benchmarks/train_profile_cpu.md)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=fused or None)
    set_base_rates(optimizer, groups)
    return optimizer


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
    pin = torch.cuda.is_available() and resolve_device(cfg.device).type == "cuda"
    train_loader = DataLoader(train_set, batch_sampler=BatchSampler(sampler, cfg.batch_size,
                                                                    drop_last=True),
                              collate_fn=collate, num_workers=cfg.num_workers, pin_memory=pin)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size,
                            sampler=ShardSampler(len(val_set), rank, world),
                            collate_fn=collate, num_workers=cfg.num_workers)
    return train_set, train_loader, val_set, val_loader


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- one epoch ---------------------------------------------------------------------
@dataclass
class EpochResult:
    """What train_one_epoch measured.

    losses: the epoch's mean losses, averaged over processes ("loss", the weighted
        total, and every unweighted term); images_per_s: all processes together;
    iterations: the iterations run; loss_per_iter: the total loss of each (this process).
    """
    losses: dict
    images_per_s: float
    iterations: int
    loss_per_iter: list


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, cfg, scaler=None,
                    progress=True, schedule=None, hooks=()):
    """One pass over loader (or cfg.iters_per_epoch batches, or until the schedule's
    time budget is spent); an EpochResult. schedule (a Schedule) sets the learning
    rates before every iteration and records them (Schedule.epoch_rates; None: they
    stay as they are). hooks: objects whose before() runs before every iteration and
    after(pixels) after it (pixels: N * H * W of its images), e.g. a ThreadTuner.
    progress: whether to show a tqdm bar (stderr, main process)."""
    model.train()
    criterion.train()
    n_iters = len(loader)
    if cfg.iters_per_epoch > 0:
        n_iters = min(n_iters, cfg.iters_per_epoch)
    sums, images, per_iter = {}, 0, []
    bar = tqdm(total=n_iters, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr,
               disable=not progress or not dist.is_main_process(), mininterval=2,
               dynamic_ncols=False, ncols=100)
    if schedule is not None:
        schedule.start_epoch(epoch, n_iters)
    start = time.perf_counter()
    for it, batch in enumerate(loader):
        if it >= n_iters or (schedule is not None and not schedule.step(optimizer, it)):
            break
        for hook in hooks:
            hook.before()
        values = train_step(model, criterion, optimizer, batch, device, cfg, scaler,
                            where=f"at epoch {epoch + 1}, iteration {it + 1}")
        n, _, h, w = batch[0].shape
        for hook in hooks:
            hook.after(n * h * w)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        images += n
        per_iter.append(round(values["loss"], 4))
        rate = images * dist.get_world_size() / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{sums['loss'] / len(per_iter):.3f}", img_s=f"{rate:.1f}",
                        refresh=False)
        bar.update()
    bar.close()
    elapsed = time.perf_counter() - start
    count = len(per_iter)
    return EpochResult(dist.reduce_mean({k: v / max(count, 1) for k, v in sums.items()}),
                       images * dist.get_world_size() / max(elapsed, 1e-9), count, per_iter)


def train_step(model, criterion, optimizer, batch, device, cfg, scaler=None, where=""):
    """One optimisation step on a collated batch (images, masks, targets): the forward
    (under autocast when cfg.amp), the set loss, the backward, gradient clipping and the
    optimizer's step. Returns the step's losses as floats ("loss", the weighted total,
    and every unweighted term), read back from the device in one copy; raises
    TrainingDiverged (saying `where`) when the loss or the model's outputs are not
    finite."""
    imgs, masks, targets = to_device(*batch, device)
    with autocast(device, cfg.amp):   # with denoising queries, the model reads targets
        outputs = model(imgs, masks, targets) if cfg.dn_detr else model(imgs, masks)
    outputs = _to_float(outputs)
    try:
        loss_dict = criterion(outputs, targets)
    except ValueError as e:               # the matcher's cost holds NaN: scipy refuses it
        bad = _not_finite(outputs)
        if bad:
            raise TrainingDiverged(f"training diverged {where}: the model's outputs "
                                   f"{', '.join(bad)} are not finite") from e
        raise
    weights = criterion.weight_dict
    loss = sum(loss_dict[k] * weights[k] for k in weights if k in loss_dict)
    # read back once per step, before the backward (the matcher waited for the forward)
    values = dict(zip(["loss", *loss_dict],
                      torch.stack([loss.detach(), *(v.detach().float()
                                                    for v in loss_dict.values())]).tolist()))
    if not math.isfinite(values["loss"]):
        bad = _not_finite(loss_dict) or _not_finite(outputs)
        raise TrainingDiverged(f"training diverged {where}: loss is {values['loss']} "
                               f"(not finite: {', '.join(bad)})")
    _optimise(loss, model, optimizer, cfg, scaler)
    return values


def _optimise(loss, model, optimizer, cfg, scaler):
    """Backward, clipping (cfg.clip_max_norm) and the step, with loss scaling when the
    scaler is on (float16)."""
    optimizer.zero_grad(set_to_none=True)
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if cfg.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
    if scaling:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def to_device(imgs, masks, targets, device):
    """A collated batch on `device`. From pinned memory (the loaders pin it when training
    on a GPU) the copies are queued without waiting for the GPU."""
    imgs, masks = imgs.to(device, non_blocking=True), masks.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in t.items()} for t in targets]
    return imgs, masks, targets


def _to_float(outputs):
    """Autocast outputs back to float32 for the loss (a no-op without AMP)."""
    if torch.is_tensor(outputs):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs


def _not_finite(tensors):
    """The names of the tensors in a dict that hold a NaN or an infinity."""
    return [k for k, v in tensors.items()
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


# --- the run -----------------------------------------------------------------------
def train(cfg, resume=None, progress=True):
    """Train cfg's model on cfg's data; evaluate every cfg.eval_every epochs (0: only at
    the end) and at the end.

    Args:
        cfg: a ddetr.config.Config.
        resume: None for a new run (refused in an output_dir that holds a previous
            run); True for cfg.output_dir/checkpoint.pth; or a checkpoint path; "auto"
            resumes when cfg.output_dir/checkpoint.pth exists (a finished run then just
            returns its results). The run continues with the checkpoint's model,
            optimizer, scheduler, scaler, RNG states and epoch; the keys of
            ddetr.config.RESUMABLE_KEYS may differ from the checkpoint's and are applied
            (e.g. a higher cfg.epochs trains longer, a new lr is set on the optimizer),
            any other changed key is refused.
        progress: show tqdm progress bars (stderr) and each evaluation's table.
    Returns:
        dict: "history" (one dict per epoch, as in log.jsonl), "stats" (the last COCO
        evaluation), "model" (unwrapped), "criterion", "postprocessor", "checkpoint"
        (its path, None when there is none), "categories".
    Raises:
        TrainingDiverged, or TrainingInterrupted (a KeyboardInterrupt: Ctrl-C), each
        saying where the run stopped and which checkpoint is kept.
    """
    device = resolve_device(cfg.device)
    check_attention_backend(cfg, device)
    rank, world = dist.init_distributed(device)
    out_dir = Path(cfg.output_dir)
    with lock_run_folder(out_dir) if dist.is_main_process() else nullcontext():
        resume_path = _checkpoint_to_resume(resume, out_dir)
        if dist.is_main_process():
            if resume_path is None:
                refuse_previous_run(out_dir)
            remove_stale_temporaries(out_dir)
        run = _build_run(cfg, device, rank, world, progress)
        if resume_path is not None:
            _resume(run, resume_path)
        if run.start_epoch >= cfg.epochs:
            _say_nothing_to_train(run)
            return _result(run)
        if dist.is_main_process():
            start_log(out_dir, run.history, run.resumed_at, resume_path, run.changed)
        _wrap_for_ddp(run)
        run.tuner = ThreadTuner.for_config(cfg, device)
        _train_and_say_how_it_stopped(run)
    return _result(run)


def _train_and_say_how_it_stopped(run):
    """_train_epochs; a divergence or Ctrl-C says which checkpoint is kept."""
    interrupted = False
    try:
        _train_epochs(run)
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}; {_what_is_kept(run, 'good ')}") from e
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if run.writer is not None:
            run.writer.close()
        if run.tuner is not None:
            run.tuner.restore()
    if interrupted:     # raised once the interrupt's traceback is gone, and with it the
        raise TrainingInterrupted(       # epoch's progress bar: it closes before this line
            f"training interrupted {_where(run)}; {_what_is_kept(run)}")


def run_progress(cfg, resume="auto"):
    """(history, finished) of the run train(cfg, resume) would continue: the epoch
    records of its checkpoint ([] for a new run), and whether it is finished (all
    cfg.epochs done, or stopped by its time limit), so that train only reads it back."""
    path = _checkpoint_to_resume(resume, Path(cfg.output_dir))
    history = load_checkpoint(path).get("history", []) if path is not None else []
    finished = bool(history) and (bool(history[-1].get("time_limited"))
                                  or len(history) >= cfg.epochs)
    return history, finished


def training_plan(cfg, resume="auto"):
    """One line on what train(cfg, resume) is about to do and how long it may take:
    read back a finished run, resume one, or start afresh (without training)."""
    history, finished = run_progress(cfg, resume)
    spent = sum(r["time_s"] for r in history) / 60
    if finished:
        return (f"the run in {cfg.output_dir} has finished ({len(history)} epochs, "
                f"{spent:.1f} min): it is read back, nothing trains")
    start = f"resumes the run in {cfg.output_dir} after epoch {len(history)}" if history \
        else f"starts a new run in {cfg.output_dir}"
    if cfg.time_limit_min > 0:
        left = max(cfg.time_limit_min - spent, 0)
        return (f"{start}: up to {left:.1f} more minutes of training (a budget of "
                f"{cfg.time_limit_min:g} min, at most {cfg.epochs} epochs), then an evaluation")
    return f"{start}: {cfg.epochs - len(history)} more epochs (no time limit)"


@dataclass
class _Run:
    """Everything one training run holds (the model unwrapped; ddp_model trains)."""
    cfg: object
    device: torch.device
    rank: int
    world: int
    progress: bool
    model: torch.nn.Module
    criterion: torch.nn.Module
    postprocessor: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    train_set: object
    train_loader: DataLoader
    val_set: object
    val_loader: DataLoader
    categories: dict
    ddp_model: torch.nn.Module = None
    writer: object = None
    tuner: ThreadTuner = None         # CPU runs with cfg.threads == 0
    history: list = field(default_factory=list)
    stats: dict = None
    resumed_at: int = None            # the checkpoint's epoch, when resumed
    saved_epoch: int = None           # the epoch of the file at .checkpoint, when known
    schedule: Schedule = None
    stage: str = None                 # past training an epoch: what the run is doing
    changed: dict = field(default_factory=dict)   # resumable keys changed on resume

    @property
    def start_epoch(self):
        if self.history and self.history[-1].get("time_limited"):
            return self.cfg.epochs                  # a time-limited run is finished
        return len(self.history)

    @property
    def checkpoint(self):
        return Path(self.cfg.output_dir) / CHECKPOINT_NAME


def _checkpoint_to_resume(resume, out_dir):
    """The checkpoint path that resume names, or None for a new run."""
    if resume == "auto":
        resume = True if (out_dir / CHECKPOINT_NAME).is_file() else None
    if not resume:
        return None
    return out_dir / CHECKPOINT_NAME if resume is True else Path(resume)


def _build_run(cfg, device, rank, world, progress):
    """The model, its optimizer and the data, seeded as every run is."""
    seed_everything(cfg.seed)                       # same initial weights on every rank
    model, criterion, postprocessor = build_model(cfg)
    model = prepare_model(model, device)
    criterion.to(device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))
    seed_everything(cfg.seed + rank)                # different augmentations per rank
    train_set, train_loader, val_set, val_loader = build_loaders(cfg, rank, world)
    categories = {c["id"]: c["name"] for c in train_set.coco.dataset.get("categories", [])}
    return _Run(cfg, device, rank, world, progress, model, criterion, postprocessor,
                optimizer, scaler, train_set, train_loader, val_set, val_loader,
                categories)


def _resume(run, path):
    """Load a training checkpoint into the run: weights, optimizer, scaler, RNG states
    and history (the schedule's progress); then apply the resumable keys that cfg
    changes."""
    state = load_checkpoint(path)
    if "config" not in state or "optimizer" not in state:
        raise CheckpointError(f"checkpoint {path} is not a ddetr training checkpoint (it has "
                              f"no config or optimizer state); resume continues a ddetr run")
    run.changed = resume_changes(state["config"], run.cfg, path)
    load_state_dict_strict(run.model, state["model"], source=f"checkpoint {path}")
    run.optimizer.load_state_dict(state["optimizer"])
    _apply_optimiser_settings(run)
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if len(rng) != run.world:
        raise CheckpointError(f"checkpoint {path} was written by {len(rng)} processes, this "
                              f"run has {run.world}; RNG states cannot be matched")
    set_rng_state(rng[run.rank])
    run.history = list(state.get("history", []))
    run.resumed_at = state["epoch"]
    if Path(path).resolve() == run.checkpoint.resolve():
        run.saved_epoch = state["epoch"]
    run.stats = run.history[-1].get("coco") if run.history else None


def _apply_optimiser_settings(run):
    """Set cfg's base rates and weight decay on the restored optimizer (they equal the
    checkpoint's unless a resume changes them; the schedule applies its drops to them
    from the next iteration, as if the run had had them from the start)."""
    set_base_rates(run.optimizer, param_groups(run.model, run.cfg))
    for group in run.optimizer.param_groups:
        group["weight_decay"] = run.cfg.weight_decay


def _say_nothing_to_train(run):
    if not (run.progress and dist.is_main_process()):
        return
    done = len(run.history)
    why = ("it stopped at its time limit" if run.history and run.history[-1].get("time_limited")
           else f"epochs={run.cfg.epochs}")
    print(f"nothing to train: the run in {run.cfg.output_dir} has trained {done} epoch(s) "
          f"and {why}; raise epochs (or time_limit_min) to train longer", flush=True)


def _wrap_for_ddp(run):
    """DDP (with synchronised batch norm on GPUs) under torchrun; tensorboard."""
    run.ddp_model = run.model
    if run.world > 1:
        if run.device.type == "cuda":   # batch statistics over all GPUs' images (CPU: none)
            run.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
        run.ddp_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=run.cfg.find_unused_parameters)
    if dist.is_main_process():
        run.writer = _tensorboard(run.cfg, Path(run.cfg.output_dir))


def _train_epochs(run):
    """Epochs start_epoch..cfg.epochs: train, evaluate when due, save, log."""
    cfg = run.cfg
    schedule = run.schedule = Schedule(cfg, run.history)
    for epoch in range(run.start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        run.stage = None
        record, result = _train_epoch(run, epoch, schedule)
        run.stage = f"after training epoch {epoch + 1}, before its checkpoint was saved"
        out_of_time = schedule.time_is_up()
        if out_of_time:
            record["time_limited"] = True
        if _evaluation_due(cfg, epoch, out_of_time):
            run.stats = record["coco"] = _evaluate(run, epoch, result)
        record["time_s"] = time.perf_counter() - t0
        schedule.end_epoch(record["time_s"])
        _check_weights(run.model, epoch)
        run.history.append(record)
        _save(run, record)
        run.stage = f"after epoch {epoch + 1} was saved"
        if out_of_time:
            if run.progress and dist.is_main_process():
                print(f"stopped at the time limit of {cfg.time_limit_min} min "
                      f"(epoch {epoch + 1}, {result.iterations} iterations)")
            break


def _train_epoch(run, epoch, schedule):
    """One epoch of training; (its log record, its EpochResult)."""
    run.train_loader.batch_sampler.sampler.set_epoch(epoch)
    t0, c0 = time.perf_counter(), time.process_time()
    result = train_one_epoch(run.ddp_model, run.criterion, run.train_loader, run.optimizer,
                             run.device, epoch, run.cfg, run.scaler, run.progress, schedule,
                             hooks=[run.tuner] if run.tuner is not None else [])
    dist.average_buffers(run.model)            # the same batch-norm statistics everywhere
    lr, lr_last, at = schedule.epoch_rates()
    train = {**result.losses, "images_per_s": result.images_per_s,
             "iterations": result.iterations, "loss_per_iter": result.loss_per_iter}
    if run.tuner is not None:
        train["threads"] = run.tuner.take_counts()
    record = {"epoch": epoch + 1, "lr": lr, "train_time_s": time.perf_counter() - t0,
              "train_cpu_s": time.process_time() - c0,   # this process, all threads
              **{f"train_{k}": v for k, v in train.items()}}
    if at is not None:                         # the drop came within this epoch:
        record["lr_last"], record["lr_changed_at"] = lr_last, at   # at that iteration
    return record, result


def _evaluation_due(cfg, epoch, out_of_time):
    """Every cfg.eval_every epochs (0: never before the end), at the end, at the time limit."""
    every = cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0
    return every or epoch + 1 == cfg.epochs or out_of_time


def _evaluate(run, epoch, trained):
    """COCO metrics on the validation set (printed with the epoch's loss: trained, its
    EpochResult)."""
    result = evaluate(run.model, run.postprocessor, run.val_loader, run.val_set.coco,
                      run.device, run.progress, run.cfg.amp)
    stats = {k: v for k, v in result.items() if k != "summary"}
    if run.progress and dist.is_main_process():
        print(f"epoch {epoch + 1}: loss {trained.losses['loss']:.3f}, "
              f"{trained.images_per_s:.1f} img/s\n{format_table(stats)}", flush=True)
    return stats


def _check_weights(model, epoch):
    """Weights that are no longer finite are never saved."""
    bad = [k for k, v in model.state_dict().items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingDiverged(f"training diverged in epoch {epoch + 1}: the weights "
                               f"{', '.join(bad[:5])} are not finite")


def _save(run, record):
    """The checkpoint (atomically), then the log line and tensorboard (main process)."""
    rng = dist.all_gather_object(get_rng_state())
    if dist.is_main_process():
        save_checkpoint({"model": run.model.state_dict(),
                         "optimizer": run.optimizer.state_dict(),
                         "scaler": run.scaler.state_dict(), "epoch": record["epoch"],
                         "rng": rng, "history": run.history, "config": config_record(run.cfg),
                         "categories": run.categories}, run.checkpoint)
        run.saved_epoch = record["epoch"]
        append_log(run.cfg.output_dir, record)
        if run.writer is not None:
            _log_tensorboard(run.writer, record)
    dist.barrier()


def _what_is_kept(run, kind=""):
    if run.saved_epoch is not None:
        return (f"the last {kind}checkpoint, {run.checkpoint} (epoch {run.saved_epoch}), "
                f"is kept")
    if run.checkpoint.is_file():
        return f"{run.checkpoint} is kept as it was"
    return "no checkpoint was written"


def _where(run):
    """Where an interrupted run stopped."""
    s = run.schedule
    if s is None:
        return "before its first iteration"
    if run.stage is not None:
        return run.stage
    return f"in epoch {s.epoch + 1} at iteration {s.iteration + 1} of {s.n_iters}"


def _result(run):
    return {"history": run.history, "stats": run.stats, "model": run.model,
            "criterion": run.criterion, "postprocessor": run.postprocessor,
            "checkpoint": run.checkpoint if run.checkpoint.is_file() else None,
            "categories": run.categories}


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
