"""DN-DETR's denoising queries: noise within its bounds, the attention mask against a
rule written per query pair, matching queries untouched by the denoising ones, groups
that do not see each other, losses with known assignments, and the config's rule."""
import pytest
import torch

from ddetr.config import get_config
from ddetr.models import build_model
from ddetr.models.denoising import (denoising_attn_mask, make_denoising_queries,
                                    noise_boxes, noise_labels)


def targets_of(*counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        out.append({"labels": torch.randint(0, 7, (n,), generator=g),
                    "boxes": torch.cat([centre, size], 1)})
    return out


def test_box_noise_stays_within_its_bounds():
    torch.manual_seed(0)
    boxes = targets_of(2000)[0]["boxes"]
    noised = noise_boxes(boxes, 0.4)
    shift = (noised[:, :2] - boxes[:, :2]).abs()
    assert (shift <= 0.4 * boxes[:, 2:] / 2 + 1e-6).all()
    ratio = noised[:, 2:] / boxes[:, 2:]
    assert (ratio >= 0.6 - 1e-6).all() and (ratio <= 1.4 + 1e-6).all()
    assert shift.max() > 0.3 * (0.4 * boxes[:, 2:] / 2).max()   # it does move them
    assert torch.equal(noise_boxes(boxes, 0.0), boxes)


def test_label_noise_flips_about_the_asked_share():
    torch.manual_seed(0)
    labels = torch.zeros(20000, dtype=torch.int64)
    flipped = (noise_labels(labels, 7, 0.2) != labels).float().mean().item()
    assert abs(flipped - 0.2 * 6 / 7) < 0.02   # a flip to the same class is no flip
    assert torch.equal(noise_labels(labels, 7, 0.0), labels)


def test_attn_mask_follows_the_rule_pair_by_pair():
    T, G, Lq = 3, 4, 5
    mask = denoising_attn_mask(T, G, Lq)
    dn = T * G
    for i in range(dn + Lq):
        for j in range(dn + Lq):
            if i >= dn:       # a matching query: no denoising query
                blocked = j < dn
            else:             # group i // T: itself and the matching queries
                blocked = j < dn and j // T != i // T
            assert mask[i, j].item() == blocked, (i, j)


def test_queries_reconstruct_their_own_objects():
    torch.manual_seed(0)
    targets = targets_of(3, 1)
    embed = torch.nn.Embedding(7, 16)
    dn = make_denoising_queries(targets, embed, num_queries=10, groups=2,
                                label_noise=0.0, box_noise=0.0)
    assert dn.tgt.shape == (2, 6, 16) and dn.boxes.shape == (2, 6, 4)
    assert dn.attn_mask.shape == (16, 16)
    for t, (query, target), tgt, boxes in zip(targets, dn.indices, dn.tgt, dn.boxes):
        assert torch.equal(boxes[query], t["boxes"][target])
        assert torch.equal(tgt[query], embed(t["labels"][target]))
    padded = torch.ones(6, dtype=torch.bool)
    padded[dn.indices[1][0]] = False
    assert (dn.tgt[1][padded] == 0).all()                 # padding carries no content
    assert make_denoising_queries([targets_of(0)[0]], embed, 10, 2, 0.2, 0.4) is None


@pytest.fixture(scope="module")
def dn_model():
    torch.manual_seed(0)
    model, criterion, _ = build_model(get_config("cpu", {"dn_detr": True}))
    return model.train(), criterion


def test_matching_queries_do_not_see_the_denoising_ones(dn_model):
    model, _ = dn_model
    images, masks = torch.randn(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool)
    masks[1, :, 80:] = True
    with torch.no_grad():
        plain = model(images, masks)
        torch.manual_seed(1)
        with_dn = model(images, masks, targets_of(3, 2))
    assert with_dn["dn_outputs"]["pred_logits"].shape == (2, 5 * 3, 7)
    torch.testing.assert_close(with_dn["pred_logits"], plain["pred_logits"])
    torch.testing.assert_close(with_dn["pred_boxes"], plain["pred_boxes"])


def test_groups_are_independent_of_each_other(dn_model):
    model, _ = dn_model
    images, masks = torch.randn(1, 3, 96, 96), torch.zeros(1, 96, 96, dtype=torch.bool)
    targets = targets_of(2)
    torch.manual_seed(1)
    dn = make_denoising_queries(targets, model.label_enc, model.num_queries, 5, 0.2, 0.4)
    changed = type(dn)(dn.tgt.clone(), dn.boxes.clone(), dn.attn_mask, dn.indices, 5)
    changed.tgt[:, 2:] += 1.0                 # every group but the first
    changed.boxes[:, 2:, :2] = 0.5
    transformer_outputs = []
    with torch.no_grad():
        for queries in (dn, changed):
            srcs, level_masks, pos = model.features(images, masks)
            hs = model.transformer(srcs, level_masks, pos, None, None, model.bbox_embed,
                                   (model.class_embed[-1], model.bbox_embed[-1]), queries,
                                   0, queries.attn_mask)[0]
            transformer_outputs.append(hs)
    same, moved = transformer_outputs
    torch.testing.assert_close(moved[:, :, :2], same[:, :, :2])           # group 0
    torch.testing.assert_close(moved[:, :, 10:], same[:, :, 10:])         # matching
    assert not torch.allclose(moved[:, :, 2:4], same[:, :, 2:4])


def test_denoising_losses_use_the_known_assignment(dn_model):
    _, criterion = dn_model
    targets = targets_of(2, 1)
    torch.manual_seed(0)
    dn = make_denoising_queries(targets, torch.nn.Embedding(7, 8), 4, 3, 0.0, 0.0)
    boxes = dn.boxes.clone()                  # no noise: every query sits on its object
    logits = torch.full((2, 6, 7), -20.0)
    for i, (query, target) in enumerate(dn.indices):
        logits[i, query, targets[i]["labels"][target]] = 20.0
    good = {"pred_logits": logits, "pred_boxes": boxes}
    losses = criterion.denoising_losses(good, dn, targets, torch.tensor(3.0))
    assert losses["loss_bbox_dn"].item() == 0 and losses["loss_giou_dn"].item() < 1e-6
    assert losses["loss_ce_dn"].item() < 1e-6
    shifted = {"pred_logits": logits, "pred_boxes": boxes.roll(1, dims=1)}
    assert criterion.denoising_losses(shifted, dn, targets,
                                      torch.tensor(3.0))["loss_bbox_dn"].item() > 0.01


def test_training_step_with_denoising_updates_the_label_table():
    from ddetr.engine.train import build_optimizer, train_step
    torch.manual_seed(0)
    cfg = get_config("cpu", {"dn_detr": True, "amp": False})
    model, criterion, _ = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    before = model.label_enc.weight.detach().clone()
    batch = (torch.randn(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool),
             targets_of(2, 3))
    values = train_step(model.train(), criterion, optimizer, batch, torch.device("cpu"), cfg)
    assert "loss_ce_dn" in values and "loss_giou_dn_0" in values
    assert not torch.equal(before, model.label_enc.weight)


@pytest.mark.parametrize("overrides", [{"two_stage": False},
                                       {"architecture": "detr", "two_stage": False,
                                        "with_box_refine": False,
                                        "num_feature_levels": 1}])
def test_config_needs_reference_boxes(overrides):
    with pytest.raises(ValueError, match="dn_detr"):
        get_config("cpu", {"dn_detr": True, **overrides})


def test_paper_presets_leave_it_off():
    from ddetr.config import PRESETS
    for name in PRESETS:
        if name != "cpu":
            assert not get_config(name).dn_detr, name


def test_the_pictures_draw_what_they_say():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ddetr.viz.training_queries import plot_noised_boxes, plot_query_mask, plot_recipe_runs
    torch.manual_seed(0)
    targets = targets_of(2)
    dn = make_denoising_queries(targets, torch.nn.Embedding(7, 8), 4, 3, 0.2, 0.4)
    ax = plot_noised_boxes(torch.zeros(64, 64, 3).numpy(), targets[0]["boxes"], dn.boxes[0],
                           3, 64)
    assert len(ax.patches) == 2 + 3 * 2                      # objects + noised copies
    ax = plot_query_mask(dn.attn_mask, [("g0", 2), ("g1", 2), ("g2", 2), ("one-to-one", 4)])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["g0", "g1", "g2", "one-to-one"]
    assert (ax.images[0].get_array() == dn.attn_mask.numpy()).all()
    runs = [{"recipe": r, "seed": s, "images_seen": 100, "epochs": 2.0,
             "evals": [{"epoch": 1.0, "AP": 0.1}, {"epoch": 2.0, "AP": 0.2 + s}]}
            for r in ("preset", "dn_detr") for s in (0, 1)]
    ax = plot_recipe_runs(runs)
    assert len(ax.lines) == 4 and list(ax.lines[1].get_xdata()) == [50.0, 100.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["preset", "dn_detr",
                                                                  "seed 0", "seed 1"]
    many = [{**runs[0], "recipe": f"r{i}"} for i in range(12)]   # more than tab10 holds
    colours = {tuple(line.get_color()) for line in plot_recipe_runs(many).lines}
    assert len(colours) == 12
    plt.close("all")


def test_recipe_summary_sets_each_recipe_against_the_plain_one():
    from ddetr.experiments.train_record import recipe_summary
    runs = [{"recipe": r, "seed": s, "images_seen": 7500, "coco": {"AP": ap}}
            for r, s, ap in (("plain", 0, 0.30), ("plain", 1, 0.34),
                             ("dn_detr", 0, 0.40), ("dn_detr", 1, 0.38))]
    lines = recipe_summary(runs)
    assert lines[0].startswith("plain") and "AP 0.320 (spread 0.040)" in lines[0]
    assert lines[-1] == ("dn_detr - plain: +0.070 AP; the larger seed spread: 0.040")
    one = recipe_summary(runs + [{"recipe": "h_detr", "seed": 1, "images_seen": 7500,
                                  "coco": {"AP": 0.31}}])
    assert "h_detr     AP 0.310 (one seed) after 7500 images: seed 1 0.310" in one
    assert one[-1] == "h_detr - plain: -0.010 AP; the larger seed spread: 0.040"


def test_the_label_table_stays_out_of_a_hugging_face_folder(dn_model):
    from ddetr.engine.huggingface import to_hf_state
    model, _ = dn_model
    assert "label_enc.weight" in model.state_dict()
    hf = to_hf_state(model.state_dict())
    assert not any("label_enc" in k for k in hf)
    plain = build_model(get_config("cpu", {"dn_detr": False}))[0]
    assert set(hf) == set(to_hf_state(plain.state_dict()))


def test_fewer_tokens_than_queries():
    """Two-stage keeps at most one proposal per token: with 9 tokens (one level, 96
    pixels) and 10 queries the denoising mask and the outputs follow the 9."""
    torch.manual_seed(0)
    cfg = get_config("cpu", {"num_feature_levels": 1, "num_queries": 10, "h_detr": True,
                             "h_detr_queries": 4})
    model, criterion, _ = build_model(cfg)
    images, masks = torch.randn(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool)
    out = model.train()(images, masks, targets_of(2, 1))
    assert out["pred_logits"].shape[1] == 9 and "one_to_many_outputs" not in out
    assert out["dn_outputs"]["pred_boxes"].shape == (2, 5 * 2, 4)
    assert set(criterion(out, targets_of(2, 1))) >= {"loss_ce_dn", "loss_bbox"}
