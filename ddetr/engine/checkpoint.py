"""Checkpoint files, all of them: writing, reading, and loading weights strictly.

Three kinds of file are read here:

- a training checkpoint (``save_checkpoint``, after every epoch): the model, optimizer,
  scheduler, grad scaler, epoch, the RNG states of every process, the config that ran
  (its paths made absolute), the per-epoch history and the category names, so that
  ``train(cfg, resume=...)`` continues the very same run;
- an official release of fundamentalvision/Deformable-DETR (``r50_deformable_detr-
  checkpoint.pth`` and the single-scale, refinement and two-stage ones): a dict with
  ``model`` (a state dict in the official parameter names, which ddetr keeps) and
  ``args`` (an argparse.Namespace). It carries no config: name the matching preset.

      model = load_official_checkpoint("r50_deformable_detr-checkpoint.pth",
                                        get_config("paper"))
      model, postprocessor, cfg, categories = load_model("r50_deformable_detr-"
                                                         "checkpoint.pth", config="paper")

- compact weights (``save_compact``): int8 with a scale per output channel, small
  enough to commit (the experiment's model shown in the book).

Writes are atomic: a temporary file in the same folder, then ``os.replace``, so the
path always holds the previous complete checkpoint or the new one, also when the
process is killed or the disk is full. Files are read with ``torch.load(weights_only=
True)``: tensors and plain values only, never code. Each way a file can be wrong has
its own one-line error (a ValueError or FileNotFoundError). Nothing is downloaded.
"""
import argparse
import errno
import os
import random
import re
import secrets
from pathlib import Path

import numpy as np
import torch

from ..config import (MODEL_KEYS, PRESETS, RESUMABLE_KEYS, config_to_dict, get_config,
                      parse_overrides)
from ..data.coco_categories import COCO_CATEGORIES
from ..files import existing_file
from ..models import build_model

COMPACT_FORMAT = "ddetr.compact/1"
PATH_KEYS = ("data_path", "output_dir", "backbone_weights")   # made absolute when saved

# What torch.load(weights_only=True) may build besides tensors and plain values: the
# official releases' argparse.Namespace and numpy's RNG state (an array of uint32).
_SAFE_GLOBALS = [argparse.Namespace, np.ndarray.__reduce__(np.zeros(0))[0], np.ndarray,
                 np.dtype, type(np.dtype(np.uint32))]


class CheckpointError(ValueError):
    """A file that cannot serve as the checkpoint asked for; the message names it."""


class CheckpointMismatchError(CheckpointError):
    """A state dict that does not fit a model. Attributes ``missing``, ``unexpected``
    (lists of keys) and ``mismatched`` (list of (key, checkpoint shape, model shape))."""

    def __init__(self, missing, unexpected, mismatched, source="state dict"):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (in the model, not in the "
                         f"checkpoint): {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (in the checkpoint, not in "
                         f"the model): {_first(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} key(s) with another shape: " + _first(
                [f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in mismatched]))
        super().__init__(f"{source} does not fit the model: " + "; ".join(parts))


def _first(names, n=50):
    shown = ", ".join(names[:n])
    return shown if len(names) <= n else f"{shown} and {len(names) - n} more"


# --- writing -------------------------------------------------------------------------
def save_checkpoint(state, path):
    """torch.save(state) to path atomically: a temporary file in the same folder, then
    os.replace. The file gets the permissions of the user's umask (as open() gives);
    the previous file at path survives any failure, and a failed write (a full disk, a
    file size limit) says so, naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            _save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(e, path) from e
        raise
    _fsync_folder(path.parent)
    return path


class _RememberedWrites:
    """A binary file for torch.save that keeps the OSError of a failed write: torch
    reports it as "unexpected pos ..." only."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _save(state, f):
    """torch.save(state, f); a failed write raises its own OSError."""
    out = _RememberedWrites(f)
    try:
        torch.save(state, out)
    except RuntimeError as e:
        if out.error is None:
            raise
        raise out.error from e


def _write_error(error, path):
    """One line for an OSError met while writing the checkpoint at path."""
    kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(error.errno, f"disk full: no space left in {path.parent} to write "
                                    f"checkpoint {path.name}; {kept}")
    return OSError(error.errno, f"cannot write checkpoint {path}: "
                                f"{error.strerror or error}; {kept}")


def _fsync_folder(folder):
    """Make the rename itself durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def config_record(cfg):
    """config_to_dict(cfg) with its paths made absolute: what a checkpoint records, so
    that reading it from another directory finds the same folders."""
    values = config_to_dict(cfg)
    for key in PATH_KEYS:
        if values.get(key) is not None:
            values[key] = os.path.abspath(os.path.expanduser(values[key]))
    return values


# --- reading ---------------------------------------------------------------------------
def read_file(path):
    """The dict a checkpoint file holds (any of the three kinds), on the CPU.

    Raises FileNotFoundError (no such file) or CheckpointError (a folder, not a torch
    file, code in the pickle, not a dict), each naming the path."""
    path = existing_file(path, "checkpoint", f"a checkpoint file (e.g. "
                         f"{Path(path) / 'checkpoint.pth'})", folder_error=CheckpointError)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        why = (f"it pickles {code.group(1)}, and checkpoints are read with "
               f"torch.load(weights_only=True), which runs no code" if code else
               "it is not a complete file written by torch.save")
        raise CheckpointError(f"{path} is not a checkpoint that ddetr can read ({why})") from e
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path} holds a {type(blob).__name__}, not a checkpoint "
                              f"(a dict with the model's weights)")
    return blob


def load_checkpoint(path):
    """The dict that save_checkpoint wrote (a training checkpoint); errors name the file."""
    state = read_file(path)
    if not isinstance(state.get("model"), dict):
        raise CheckpointError(f"checkpoint {path} holds no 'model' entry; is it a ddetr "
                              f"checkpoint?")
    return state


def model_state_dict(blob):
    """The model's state dict in any kind of file: the "model" entry (training
    checkpoints, official releases), the dequantised "state" of compact weights, or
    the file itself when it is a bare state dict."""
    if blob.get("format") == COMPACT_FORMAT:
        return {name: _dequantise(v) for name, v in blob["state"].items()}
    if isinstance(blob.get("model"), dict):
        return blob["model"]
    return blob


def read_checkpoint(path):
    """The model state dict in the checkpoint file at path (see model_state_dict)."""
    return model_state_dict(read_file(path))


def is_official(blob):
    """Whether a checkpoint dict is an official release (its ``args``, no config)."""
    return isinstance(blob.get("args"), argparse.Namespace) and "config" not in blob


# --- loading into a model --------------------------------------------------------------
def load_state_dict_strict(model, state_dict, source="state dict"):
    """model.load_state_dict(state_dict, strict=True), but first compare the keys and
    shapes and raise CheckpointMismatchError listing every key that does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [(k, state_dict[k].shape, own[k].shape) for k in own
                  if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source)
    model.load_state_dict(state_dict, strict=True)
    return model


def load_official_checkpoint(path, cfg, model=None):
    """Build the model of cfg (or take ``model``) and load the checkpoint at path
    strictly. Returns the model, in eval mode."""
    if model is None:
        model = build_model(cfg)[0]
    load_state_dict_strict(model, read_checkpoint(path), source=f"checkpoint {path}")
    return model.eval()


def load_model(path, config=None, overrides=None):
    """(model in eval mode on the CPU, postprocessor, cfg, categories {id: name}) from
    any checkpoint file.

    config: a preset name or YAML path, for a file that carries no config (an official
        release, whose boxes then get COCO's category names); a file with a config
        needs none (giving one is an error, so that it is never silently ignored).
    overrides: dict or "key=value" list on top of the config (e.g. another data_path);
        the keys that define the model (ddetr.config.MODEL_KEYS) cannot change.
    """
    return _model_from(read_file(path), path, config, overrides)


def _model_from(blob, path, config=None, overrides=None):
    cfg = checkpoint_config(blob, path, config, overrides)
    model, _, postprocessor = build_model(cfg)
    load_state_dict_strict(model, model_state_dict(blob), source=f"checkpoint {path}")
    categories = blob.get("categories") or {}
    if is_official(blob) and getattr(blob["args"], "dataset_file", "coco") == "coco":
        categories = dict(COCO_CATEGORIES)
    return model.eval(), postprocessor, cfg, categories


def checkpoint_config(blob, path, config=None, overrides=None):
    """The Config of a checkpoint dict: its own (paths absolute, relative ones of older
    checkpoints taken from the current directory), or ``config`` for a file that has
    none; then overrides, which may not change the model's keys."""
    overrides = parse_overrides(overrides)
    saved = blob.get("config")
    if saved is not None and config is not None:
        raise CheckpointError(f"checkpoint {path} carries its own config; pass overrides "
                              f"instead of config={config!r}")
    if saved is None and config is None:
        kind = "an official release" if is_official(blob) else "a file"
        raise CheckpointError(f"checkpoint {path} carries no config ({kind} without one); "
                              f"name the preset it was trained with (config=, CLI --config), "
                              f"one of {sorted(PRESETS)} or a YAML file")
    if saved is not None:
        changed = sorted(k for k in overrides if k in MODEL_KEYS and overrides[k] != saved.get(k))
        if changed:
            raise CheckpointError(f"checkpoint {path} holds a model with "
                                  + ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
                                  + "; overrides cannot change it")
        # a key the saved config lacks takes Config's default
        cfg = get_config("paper", {**saved, **overrides})
    else:
        cfg = get_config(config, overrides)
    if is_official(blob):
        _check_official_args(blob["args"], cfg, path, config)
    for key in PATH_KEYS:
        if getattr(cfg, key) is not None:
            setattr(cfg, key, os.path.abspath(os.path.expanduser(getattr(cfg, key))))
    return cfg


def require_data(cfg, path, overrides=None):
    """Refuse to use a checkpoint's data_path that does not exist here (generating data
    there would silently evaluate on something else); a data_path given in overrides
    is the user's choice and passes."""
    if "data_path" in parse_overrides(overrides) or Path(cfg.data_path).is_dir():
        return
    raise CheckpointError(f"checkpoint {path} was trained on data_path {cfg.data_path}, "
                          f"which does not exist here; pass data_path=<folder> to use "
                          f"other data")


# The official releases' argument names for the keys that define the model.
OFFICIAL_ARGS = {"backbone": "backbone", "dilation": "dilation",
                 "num_feature_levels": "num_feature_levels", "hidden_dim": "d_model",
                 "nheads": "n_heads", "enc_layers": "enc_layers", "dec_layers": "dec_layers",
                 "dim_feedforward": "dim_feedforward", "enc_n_points": "enc_n_points",
                 "dec_n_points": "dec_n_points", "num_queries": "num_queries",
                 "with_box_refine": "with_box_refine", "two_stage": "two_stage"}


def _check_official_args(args, cfg, path, config):
    """The preset must build the model that the release's args describe."""
    differ = [(key, getattr(args, arg), getattr(cfg, key)) for arg, key in OFFICIAL_ARGS.items()
              if hasattr(args, arg) and getattr(args, arg) != getattr(cfg, key)]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} was trained with "
            + ", ".join(f"{k}={a!r}" for k, a, _ in differ) + f"; config {config!r} has "
            + ", ".join(f"{k}={b!r}" for k, _, b in differ)
            + " (pick the preset that matches, e.g. paper_box_refine, or override the keys)")


# --- resuming: the config that ran, and the keys that may change ---------------------------
def resume_changes(saved, cfg, path):
    """{key: (checkpoint value, new value)} for the keys of RESUMABLE_KEYS that cfg
    changes; raises CheckpointError naming every other changed key with both values.

    Paths compare as absolute paths (relative ones are taken from the current
    directory); data_path may change to a folder that exists (data moved)."""
    now = config_record(cfg)
    differ = {}
    for key, old in saved.items():
        if key not in now:
            continue                  # a key this Config does not have: nothing to compare
        if key in PATH_KEYS and old is not None:
            old = os.path.abspath(os.path.expanduser(old))
        if old != now[key]:
            differ[key] = (old, now[key])
    refused = {k: v for k, v in differ.items() if k not in RESUMABLE_KEYS
               and not (k == "data_path" and Path(v[1]).is_dir())}
    if refused:
        listed = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now"
                           for k, (a, b) in refused.items())
        raise CheckpointError(f"checkpoint {path} was written with other settings ({listed}); "
                              f"resume it with its own, or train into another output_dir "
                              f"(the keys that may change: ddetr.config.RESUMABLE_KEYS)")
    return differ


# --- random generators ---------------------------------------------------------------------
def get_rng_state():
    """The state of every random generator this process uses."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- compact weights (for the book) ------------------------------------------------------
def save_compact(model, cfg, categories, path, source=None):
    """Save model's weights small enough to commit: tensors with >= 2 dims and more than
    4096 values as int8 with one float scale per output channel (symmetric), the rest
    as fp16. About a quarter of the float32 size; ``load_compact`` restores floats."""
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu()
        if t.dim() >= 2 and t.numel() > 4096:
            flat = t.reshape(t.shape[0], -1)
            scale = flat.abs().amax(1).clamp(min=1e-12) / 127.0
            q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
            state[name] = {"q": q.reshape(t.shape), "scale": scale.half()}
        elif t.is_floating_point():
            state[name] = t.half()
        else:
            state[name] = t
    save_checkpoint({"format": COMPACT_FORMAT, "config": config_to_dict(cfg),
                     "categories": categories, "source": source or {}, "state": state}, path)


def load_compact(path):
    """(model in eval mode, postprocessor, cfg, categories, source) from save_compact."""
    blob = read_file(path)
    if blob.get("format") != COMPACT_FORMAT:
        raise CheckpointError(f"{path} is not a compact checkpoint (format "
                              f"{blob.get('format')!r}, expected {COMPACT_FORMAT!r})")
    model, postprocessor, cfg, categories = _model_from(blob, path)
    return model, postprocessor, cfg, categories, blob["source"]


def _dequantise(v):
    """A float tensor from an entry of save_compact's state."""
    if isinstance(v, dict):
        shape = v["q"].shape
        v = (v["q"].reshape(shape[0], -1).float() * v["scale"].float()[:, None]).reshape(shape)
    return v.float() if v.is_floating_point() else v
