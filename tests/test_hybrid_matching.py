"""H-DETR's one-to-many branch: the one-to-one queries untouched by it (the mask
against a rule written per pair, and the outputs), the repeated targets, its losses,
and the config's rule."""
import pytest
import torch

from ddetr.config import get_config
from ddetr.models import build_model
from ddetr.models.hybrid_matching import hybrid_attn_mask, repeat_targets

from test_denoising import targets_of


def test_mask_follows_the_rule_pair_by_pair():
    from ddetr.models.denoising import denoising_attn_mask
    T, G, Lq, extra = 2, 2, 3, 4
    dn = T * G
    mask = hybrid_attn_mask(denoising_attn_mask(T, G, Lq + extra), dn, Lq, extra)
    kind = ["dn"] * dn + ["one"] * Lq + ["many"] * extra
    for i in range(len(kind)):
        for j in range(len(kind)):
            if kind[i] == "dn":
                sees = (kind[j] == "dn" and i // T == j // T) or kind[j] == "one"
            else:
                sees = kind[j] == kind[i]
            assert mask[i, j].item() == (not sees), (i, j)
    plain = hybrid_attn_mask(None, 0, Lq, extra)
    assert plain.shape == (Lq + extra, Lq + extra) and not plain[:Lq, :Lq].any()


def test_targets_repeat_k_times():
    t = targets_of(3)[0]
    r = repeat_targets([t], 4)[0]
    assert torch.equal(r["labels"], t["labels"].repeat(4))
    assert torch.equal(r["boxes"][3:6], t["boxes"]) and len(r["boxes"]) == 12


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    cfg = get_config("cpu", {"h_detr": True, "h_detr_queries": 20, "dn_detr": True})
    model, criterion, _ = build_model(cfg)
    return model.train(), criterion, cfg


def test_one_to_one_queries_do_not_see_the_others(hybrid):
    model, _, cfg = hybrid
    images, masks = torch.randn(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool)
    targets = targets_of(2, 3)
    with torch.no_grad():
        with_branch = model(images, masks, targets)
        model.one_to_many = 0
        torch.manual_seed(0)
        plain = model(images, masks)
        model.one_to_many = 20
    assert with_branch["one_to_many_outputs"]["pred_boxes"].shape == (2, 20, 4)
    assert with_branch["pred_boxes"].shape == (2, cfg.num_queries, 4)
    torch.testing.assert_close(with_branch["pred_logits"], plain["pred_logits"])
    torch.testing.assert_close(with_branch["pred_boxes"], plain["pred_boxes"])
    model.eval()
    with torch.no_grad():
        assert "one_to_many_outputs" not in model(images, masks, targets)
    model.train()


def test_its_losses_reach_the_weights(hybrid):
    model, criterion, cfg = hybrid
    images, masks = torch.randn(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool)
    targets = targets_of(2, 3)
    out = model(images, masks, targets)
    losses = criterion(out, targets)
    names = [k for k in losses if "_o2m" in k]
    assert len(names) == 3 * cfg.dec_layers
    assert all(k in criterion.weight_dict for k in names)
    model.zero_grad()
    losses["loss_giou_o2m"].backward()
    assert model.bbox_embed[-2].layers[-1].bias.grad.abs().sum() > 0


def test_config_needs_two_stage():
    with pytest.raises(ValueError, match="h_detr"):
        get_config("cpu", {"h_detr": True, "two_stage": False})
