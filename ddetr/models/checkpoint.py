"""Loading weights strictly, with errors that say which keys did not fit.

The model's parameter names follow the official Deformable DETR release
(fundamentalvision/Deformable-DETR), so its published checkpoints (``r50_deformable_
detr-checkpoint.pth`` and the single-scale, refinement and two-stage ones) load with
``strict=True`` into the model that ``build_model`` makes from the matching preset:

    cfg = get_config("paper_box_refine")
    model = load_official_checkpoint("r50_deformable_detr_plus_iterative_bbox_"
                                     "refinement-checkpoint.pth", cfg)

Nothing is downloaded; the file must be on disk.
"""
import argparse
from pathlib import Path

import torch


class CheckpointMismatchError(RuntimeError):
    """A state dict that does not fit a model. Attributes ``missing``, ``unexpected``
    (lists of keys) and ``mismatched`` (list of (key, checkpoint shape, model shape))."""

    def __init__(self, missing, unexpected, mismatched, source="state dict"):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"{source} does not fit the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s) (in the model, not in the "
                         f"checkpoint): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s) (in the checkpoint, not "
                         f"in the model): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  {len(mismatched)} key(s) with another shape: " + ", ".join(
                f"{k} (checkpoint {tuple(a)}, model {tuple(b)})" for k, a, b in mismatched))
        super().__init__("\n".join(lines))


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


def read_checkpoint(path):
    """The model state dict in a checkpoint file: the file's "model" entry when it has
    one (training checkpoints, the official ones), else the file itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # the official checkpoints also pickle their argparse.Namespace of arguments
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def load_official_checkpoint(path, cfg, model=None):
    """Build the model of cfg (or take ``model``) and load the checkpoint at path
    strictly. Returns the model, in eval mode."""
    if model is None:
        from . import build_model
        model = build_model(cfg)[0]
    load_state_dict_strict(model, read_checkpoint(path), source=str(path))
    return model.eval()
