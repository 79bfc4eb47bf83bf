"""Record the outputs of small seeded detectors (and the state-dict keys of the paper
presets) to tests/data/model_outputs.pt, for test_models.py::test_outputs_match_recording.

The file was written by the code *before* a refactoring, so the test proves that the
refactored code computes bit for bit the same thing. Re-record only on purpose (a change
that is meant to change the numbers):  python tests/model_recording.py
"""
import platform
from pathlib import Path

import torch

from ddetr.config import get_config
from ddetr.experiments.machine import machine_description
from ddetr.models import build_model

DATA = Path(__file__).resolve().parent / "data"
PAPER_PRESETS = ("paper", "paper_single_scale", "paper_box_refine", "paper_two_stage")
SMALL = {"architecture": "deformable_detr", "backbone": "regnet_x_400mf",
         "backbone_norm": "batch_norm", "d_model": 32, "n_heads": 4, "enc_layers": 2,
         "dec_layers": 2, "dim_feedforward": 64, "dropout": 0.0, "num_queries": 10,
         "num_classes": 5, "num_feature_levels": 4, "with_box_refine": False,
         "two_stage": False, "aux_loss": True, "attention_backend": "reference",
         "dn_detr": False}
VARIANTS = {
    "multi_scale": {},
    "single_scale": {"num_feature_levels": 1},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "dab": {"with_box_refine": True, "query_anchors": "dab"},
    "detr": {"architecture": "detr", "num_feature_levels": 1},
}


def small_inputs():
    """Two images, 64 x 80 and 48 x 64, padded to 64 x 80."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 80, generator=gen)
    masks = torch.zeros(2, 64, 80, dtype=torch.bool)
    masks[1, 48:, :] = True
    masks[1, :, 64:] = True
    images[1][:, masks[1]] = 0
    return images, masks


def small_model(variant):
    torch.manual_seed(0)
    return build_model(get_config("cpu", {**SMALL, **VARIANTS[variant]}))[0].eval()


def flat_outputs(out, prefix=""):
    """The model's output dict as {"pred_logits": t, "aux_outputs.0.pred_boxes": t...}."""
    flat = {}
    for key, value in out.items():
        if isinstance(value, list):
            for i, item in enumerate(value):
                flat.update(flat_outputs(item, f"{prefix}{key}.{i}."))
        elif isinstance(value, dict):
            flat.update(flat_outputs(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def record():
    images, masks = small_inputs()
    outputs, keys = {}, {}
    for variant in VARIANTS:
        model = small_model(variant)
        keys[variant] = list(model.state_dict())
        with torch.no_grad():
            outputs[variant] = flat_outputs(model(images, masks))
    for preset in PAPER_PRESETS:
        keys[preset] = list(build_model(get_config(preset))[0].state_dict())
    return {"outputs": outputs, "state_dict_keys": keys, "torch": str(torch.__version__),
            "machine": platform.machine(), "cpu": machine_description("cpu")["cpu"]}


if __name__ == "__main__":
    torch.save(record(), DATA / "model_outputs.pt")
