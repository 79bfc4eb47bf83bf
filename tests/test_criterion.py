"""The set criterion, the loss weights and the postprocessor."""
import pytest
import torch
import torch.distributed as dist

from ddetr.config import get_config
from ddetr.models import PostProcess, build_model, build_weight_dict
from ddetr.models.criterion import SetCriterion, num_boxes_across_processes
from ddetr.models.matcher import HungarianMatcher

# the cpu preset made plain (whatever it sets)
PLAIN = {"architecture": "deformable_detr", "num_feature_levels": 4,
         "with_box_refine": False, "two_stage": False, "aux_loss": True, "dn_detr": False}


def empty_targets(n):
    return [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
            for _ in range(n)]


def batch():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 128)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, 64:] = True
    targets = [{"labels": torch.tensor([1, 3]),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]])}]
    return images, masks, targets


def total(losses, weight_dict):
    return sum(losses[k] * w for k, w in weight_dict.items() if k in losses)


def test_weight_dict_names():
    cfg = get_config("paper_two_stage")
    w = build_weight_dict(cfg)
    assert w["loss_ce"] == 2 and w["loss_bbox"] == 5 and w["loss_giou"] == 2
    assert {"loss_ce_0", "loss_giou_4", "loss_bbox_enc"} <= set(w)
    assert "loss_ce_5" not in w
    assert len(w) == 3 * (1 + 5 + 1)
    assert "loss_ce_enc" not in build_weight_dict(get_config("paper"))


@pytest.mark.parametrize("overrides", [{}, {"with_box_refine": True, "two_stage": True}])
def test_losses_finite_with_empty_targets(overrides):
    cfg = get_config("cpu", {**PLAIN, **overrides})
    model, criterion, _ = build_model(cfg)
    images, masks, _ = batch()
    losses = criterion(model(images, masks), empty_targets(2))
    assert set(criterion.weight_dict) <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_ce"] > 0
    total(losses, criterion.weight_dict).backward()


@pytest.mark.parametrize("overrides", [{}, {"with_box_refine": True, "two_stage": True},
                                       {"architecture": "detr", "num_feature_levels": 1},
                                       {"backbone": "resnet18", "backbone_norm": "frozen_bn"}])
def test_gradients_reach_every_trainable_parameter(overrides):
    cfg = get_config("cpu", {**PLAIN, **overrides})
    model, criterion, _ = build_model(cfg)
    images, masks, targets = batch()
    total(criterion(model(images, masks), targets), criterion.weight_dict).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # at initialisation some gradients are exactly zero (the box heads' last layers and
    # the offset/attention-weight predictors start at zero); move away from it
    model.zero_grad()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    total(criterion(model(images, masks), targets), criterion.weight_dict).backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and not p.grad.abs().sum() > 0]
    assert not missing
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if cfg.backbone_norm == "frozen_bn":      # the paper's setting for a pretrained ResNet
        assert frozen and all(n.startswith(("backbone.0.body.conv1",
                                            "backbone.0.body.layer1")) for n in frozen)
    else:                                     # the preset's backbone trains from scratch
        assert not frozen


def test_loss_values_on_a_perfect_prediction():
    """Matched perfect boxes give zero box losses; normalised by the number of boxes."""
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 1, 1] = 10.0
    boxes = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    criterion = SetCriterion(4, HungarianMatcher(), {})
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_ce"].item() < 1e-3
    assert losses["class_error"].item() == 0


def test_labels_out_of_range_raise():
    criterion = SetCriterion(4, HungarianMatcher(), {})
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_boxes": torch.rand(1, 3, 4)}
    with pytest.raises(ValueError, match="labels"):
        criterion(outputs, [{"labels": torch.tensor([4]), "boxes": torch.rand(1, 4)}])


def test_postprocess_topk_and_scaling():
    logits = torch.full((2, 5, 3), -5.0)
    logits[0, 2, 1] = 5.0
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]]).repeat(2, 5, 1)
    results = PostProcess(num_select=4)({"pred_logits": logits, "pred_boxes": boxes},
                                        torch.tensor([[100, 200], [50, 60]]))
    assert len(results) == 2 and results[0]["scores"].shape == (4,)
    assert results[0]["labels"][0].item() == 1
    torch.testing.assert_close(results[0]["boxes"][0], torch.tensor([50.0, 25.0, 150.0, 75.0]))
    torch.testing.assert_close(results[1]["boxes"][0], torch.tensor([15.0, 12.5, 45.0, 37.5]))
    assert len(PostProcess()({"pred_logits": logits, "pred_boxes": boxes},
                             torch.tensor([[1, 1], [1, 1]]))[0]["scores"]) == 15


def test_num_boxes_with_torch_distributed(tmp_path):
    """With a process group, the box count is summed over processes and divided by the
    world size (here a group of one)."""
    targets = [{"labels": torch.tensor([1, 2])}, {"labels": torch.tensor([3])}]
    assert num_boxes_across_processes(targets, "cpu") == 3
    assert num_boxes_across_processes([{"labels": torch.zeros(0)}], "cpu") == 1
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        assert num_boxes_across_processes(targets, "cpu") == 3
    finally:
        dist.destroy_process_group()
