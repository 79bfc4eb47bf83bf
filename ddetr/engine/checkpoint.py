"""Checkpoints that survive a kill: written to a temporary file, then renamed.

``os.replace`` is atomic on POSIX, so ``checkpoint.pth`` is always either the previous
complete checkpoint or the new complete one, never half of one. A checkpoint holds the
model, optimizer, scheduler, grad scaler, epoch, the RNG states of every process, the
config and the per-epoch history, so that ``--resume`` continues the very same run.
"""
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(state, path):
    """torch.save(state) to path atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, map_location="cpu"):
    """The dict that save_checkpoint wrote; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {path} holds no 'model' entry; is it a ddetr checkpoint?")
    return state


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
