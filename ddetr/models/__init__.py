"""The detectors, their loss and their postprocessing.

    model, criterion, postprocessor = build_model(cfg)
    outputs = model(images, masks)            # images (N, 3, H, W), masks (N, H, W)
    losses = criterion(outputs, targets)      # unweighted; criterion.weight_dict
    results = postprocessor(outputs, sizes)   # sizes (N, 2) (h, w) of the originals

cfg.architecture picks Deformable DETR ("deformable_detr", with the switches
num_feature_levels, with_box_refine, two_stage) or the dense baseline ("detr").
"""
from .sampling_recorder import record_sampling
from .backbone import Backbone, Joiner, build_backbone
from .criterion import SetCriterion, build_criterion, build_weight_dict
from .deformable_detr import DeformableDETR, build_deformable_detr
from .detr import DETR, MLP, build_detr
from .matcher import HungarianMatcher, build_matcher
from .postprocess import PostProcess

ARCHITECTURES = ("deformable_detr", "detr")


def build_model(cfg):
    """(model, criterion, postprocessor) for a Config."""
    if cfg.architecture == "deformable_detr":
        model = build_deformable_detr(cfg)
    elif cfg.architecture == "detr":
        model = build_detr(cfg)
    else:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, "
                         f"got {cfg.architecture!r}")
    return model, build_criterion(cfg), PostProcess(num_select=100)


def count_parameters(model):
    """(total, trainable) numbers of parameters (shared ones counted once)."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params),
            sum(p.numel() for p in params if p.requires_grad))


__all__ = [
    "Backbone", "DETR", "DeformableDETR", "HungarianMatcher",
    "Joiner", "MLP", "PostProcess", "SetCriterion", "build_backbone", "build_criterion",
    "build_deformable_detr", "build_detr", "build_matcher", "build_model",
    "build_weight_dict", "count_parameters", "record_sampling",
]
