"""RT-DETR's IoU-aware classification (ddetr.models.iou_aware): the varifocal loss
against VarifocalNet's equation written score by score, its gradient in float64, the
IoU targets against boxes worked by hand, and the criterion and model with the switch."""
import math

import torch

from ddetr.config import get_config
from ddetr.models import build_model
from ddetr.models.criterion import SetCriterion
from ddetr.models.iou_aware import matched_iou, varifocal_loss
from ddetr.models.matcher import HungarianMatcher

from test_denoising import targets_of


def vfl_by_the_equation(logits, target, alpha=0.75, gamma=2.0):
    """VarifocalNet's Eq. 2, one score at a time."""
    total = 0.0
    for x, q in zip(logits.flatten().tolist(), target.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        if q > 0:
            total += -q * (q * math.log(p) + (1 - q) * math.log(1 - p))
        else:
            total += -alpha * p ** gamma * math.log(1 - p)
    return total


def random_scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) * 2
    target = torch.zeros_like(logits)
    target[0, 1, 2], target[1, 4, 0], target[1, 0, 1] = 0.8, 0.35, 1.0
    return logits, target


def test_loss_is_the_papers_equation():
    logits, target = random_scores()
    got = varifocal_loss(logits, target).item()
    assert math.isclose(got, vfl_by_the_equation(logits, target), rel_tol=1e-9)
    # bfloat16 logits are computed in float32
    assert varifocal_loss(logits.bfloat16(), target).dtype == torch.float32


def test_gradient_includes_the_negatives_weight():
    logits, target = random_scores(1)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: varifocal_loss(x, target), (logits,))
    # d/dx of -alpha p^2 log(1 - p) at a negative score, worked by hand
    varifocal_loss(logits, target).backward()
    x = logits[0, 0, 0].item()
    p = 1 / (1 + math.exp(-x))
    by_hand = 0.75 * (-2 * p * p * (1 - p) * math.log(1 - p) + p ** 3)
    assert math.isclose(logits.grad[0, 0, 0].item(), by_hand, rel_tol=1e-9)


def test_matched_iou_by_hand():
    src = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]])
    tgt = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]])
    # identical; shifted by half a width (overlap 0.1 x 0.2 over 0.3 x 0.2); disjoint
    torch.testing.assert_close(matched_iou(src, tgt), torch.tensor([1.0, 1 / 3, 0.0]))
    assert matched_iou(src[:0], tgt[:0]).shape == (0,)


def test_criterion_targets_the_matched_iou():
    """One image, two objects; query 0 predicts object 0's box exactly, query 2 half a
    width off object 1: the matched scores' targets are 1 and 1/3, all others 0."""
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    targets = [{"labels": torch.tensor([1, 2]), "boxes": boxes}]
    pred_boxes = torch.full((1, 4, 4), 0.05)
    pred_boxes[0, 0], pred_boxes[0, 2] = boxes[0], torch.tensor([0.4, 0.3, 0.2, 0.2])
    logits = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0))
    outputs = {"pred_logits": logits, "pred_boxes": pred_boxes}
    criterion = SetCriterion(3, HungarianMatcher(), {}, iou_aware=True)
    indices = [(torch.tensor([0, 2]), torch.tensor([0, 1]))]
    target = torch.zeros(1, 4, 3)
    target[0, 0, 1], target[0, 2, 2] = 1.0, 1 / 3
    got = criterion.loss_labels(outputs, targets, indices, torch.tensor(2.0))["loss_ce"]
    torch.testing.assert_close(got, varifocal_loss(logits, target) / 2)
    focal = SetCriterion(3, HungarianMatcher(), {})
    assert not torch.isclose(got, focal.loss_labels(outputs, targets, indices,
                                                    torch.tensor(2.0))["loss_ce"])


def test_model_trains_with_the_switch():
    torch.manual_seed(0)
    cfg = get_config("cpu", {"rt_detr_vfl": True, "num_feature_levels": 1,
                             "num_queries": 10})
    model, criterion, _ = build_model(cfg)
    assert criterion.iou_aware
    images, masks = torch.randn(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool)
    targets = targets_of(2, 3)
    losses = criterion(model.train()(images, masks, targets), targets)
    for name in ("loss_ce", "loss_ce_enc", "loss_ce_dn"):
        assert torch.isfinite(losses[name])
    losses["loss_ce"].backward()
    assert model.class_embed[cfg.dec_layers - 1].bias.grad.abs().sum() > 0
