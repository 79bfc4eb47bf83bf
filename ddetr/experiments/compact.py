"""Compact weights for the book: a trained model's state stored small enough to commit
(int8 per output channel for large matrices, fp16 for the rest).

(The one home of checkpoint formats is ``ddetr.engine.checkpoint``; these two functions
move there.)
"""
import torch

from ..config import config_to_dict, get_config
from ..models import build_model


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
    torch.save({"format": "ddetr.compact/1", "config": config_to_dict(cfg),
                "categories": categories, "source": source or {}, "state": state}, path)


def load_compact(path):
    """(model in eval mode, postprocessor, cfg, categories, source) from save_compact."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != "ddetr.compact/1":
        raise ValueError(f"{path} is not a compact checkpoint (format "
                         f"{blob.get('format')!r}, expected 'ddetr.compact/1')")
    cfg = get_config("cpu", blob["config"])
    model, _, postprocessor = build_model(cfg)
    state = {}
    for name, v in blob["state"].items():
        if isinstance(v, dict):
            shape = v["q"].shape
            v = (v["q"].reshape(shape[0], -1).float()
                 * v["scale"].float()[:, None]).reshape(shape)
        state[name] = v.float() if v.is_floating_point() else v
    model.load_state_dict(state)
    return model.eval(), postprocessor, cfg, blob["categories"], blob["source"]
