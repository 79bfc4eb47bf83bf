"""DINO's look forward twice: the same outputs, and a layer's box loss reaching the
box head of the layer before it (which the detached references never let it do)."""
import pytest
import torch

from ddetr.config import get_config
from ddetr.models import build_model


def last_layer_grads(look_forward_twice):
    torch.manual_seed(0)
    cfg = get_config("cpu", {"dino_look_forward_twice": look_forward_twice})
    model = build_model(cfg)[0].train()
    images, masks = torch.randn(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool)
    out = model(images, masks)
    out["pred_boxes"].sum().backward()            # the last layer's boxes only
    before_last = model.bbox_embed[cfg.dec_layers - 2].layers[-1].bias.grad
    return out["pred_boxes"].detach(), before_last


def test_outputs_are_the_same_and_only_the_gradient_path_changes():
    boxes, grad = last_layer_grads(False)
    boxes_lft, grad_lft = last_layer_grads(True)
    torch.testing.assert_close(boxes_lft, boxes)
    assert grad is None or grad.abs().sum() == 0
    assert grad_lft is not None and grad_lft.abs().sum() > 0


def test_config_needs_refinement():
    with pytest.raises(ValueError, match="dino_look_forward_twice"):
        get_config("cpu", {"dino_look_forward_twice": True, "with_box_refine": False,
                           "two_stage": False})
