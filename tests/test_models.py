"""The detectors: structure (parameter counts, official names), forward shapes on
padded batches, padding invariance, the sampling recorder, overfitting one batch, and
strict checkpoint loading."""
import platform

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from ddetr.config import get_config
from ddetr.experiments.machine import machine_description
from ddetr.engine.checkpoint import (CheckpointMismatchError, load_official_checkpoint,
                                    load_state_dict_strict)
from ddetr.models import Backbone, build_model, count_parameters, record_sampling
from ddetr.models.detr import MLP
from ddetr.nn import DeformableTransformer, PositionEmbeddingSine, Transformer

import model_recording as recording  # tests/model_recording.py

# (total, trainable) of the official release with ResNet-50, 91 classes, 300 queries
PAPER_COUNTS = {
    "paper": (40_069_665, 39_847_265),
    "paper_single_scale": (34_066_593, 33_844_193),
    "paper_box_refine": (40_849_660, 40_627_260),
    "paper_two_stage": (41_181_529, 40_959_129),
}

# the cpu preset made plain (whatever it sets), so each variant is exactly what it says
PLAIN = {"architecture": "deformable_detr", "num_feature_levels": 4,
         "with_box_refine": False, "two_stage": False, "aux_loss": True, "dn_detr": False}
VARIANTS = {
    "multi_scale": {},
    "single_scale": {"num_feature_levels": 1},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "detr": {"architecture": "detr", "num_feature_levels": 1},
    "dense_baseline": {"attention": "dense", "num_feature_levels": 1},
    "dense_two_stage": {"attention": "dense", "with_box_refine": True, "two_stage": True},
}


def padded_batch():
    """Two images of different sizes, 128 x 160 and 96 x 128, padded to 128 x 160."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 128, 160)
    masks = torch.zeros(2, 128, 160, dtype=torch.bool)
    images[1, :, 96:, :] = 0
    images[1, :, :, 128:] = 0
    masks[1, 96:, :] = True
    masks[1, :, 128:] = True
    return images, masks


def small_targets():
    return [{"labels": torch.tensor([1, 3]),
             "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.2]])}]


@pytest.mark.parametrize("preset", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(preset):
    model, _, _ = build_model(get_config(preset))
    assert count_parameters(model) == PAPER_COUNTS[preset]


def test_official_parameter_names():
    keys = set(build_model(get_config("paper_two_stage"))[0].state_dict())
    for key in ["backbone.0.body.layer2.0.conv1.weight", "backbone.0.body.bn1.running_mean",
                "input_proj.0.0.weight", "input_proj.3.1.bias", "transformer.level_embed",
                "transformer.encoder.layers.5.self_attn.sampling_offsets.weight",
                "transformer.encoder.layers.0.norm1.weight",
                "transformer.encoder.layers.0.linear1.weight",
                "transformer.decoder.layers.5.cross_attn.value_proj.weight",
                "transformer.decoder.layers.0.self_attn.in_proj_weight",
                "transformer.decoder.layers.0.self_attn.out_proj.weight",
                "transformer.decoder.bbox_embed.6.layers.2.bias",
                "transformer.decoder.class_embed.6.weight",
                "transformer.enc_output.weight", "transformer.enc_output_norm.weight",
                "transformer.pos_trans.weight", "transformer.pos_trans_norm.weight",
                "class_embed.6.weight", "bbox_embed.0.layers.0.weight"]:
        assert key in keys, key
    assert not any("num_batches_tracked" in k for k in keys)
    keys = set(build_model(get_config("paper"))[0].state_dict())
    assert {"query_embed.weight", "transformer.reference_points.weight"} <= keys


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_padded_batch_shapes(variant):
    cfg = get_config("cpu", {**PLAIN, **VARIANTS[variant]})
    model, _, post = build_model(cfg)
    images, masks = padded_batch()
    out = model(images, masks)
    N, Q, K = 2, cfg.num_queries, cfg.num_classes
    assert out["pred_logits"].shape == (N, Q, K)
    assert out["pred_boxes"].shape == (N, Q, 4)
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for o in [out] + out["aux_outputs"] + ([out["enc_outputs"]] if cfg.two_stage else []):
        assert torch.isfinite(o["pred_logits"]).all()
        assert torch.isfinite(o["pred_boxes"]).all()
        assert ((o["pred_boxes"] >= 0) & (o["pred_boxes"] <= 1)).all()
    assert ("enc_outputs" in out) == cfg.two_stage
    if cfg.two_stage:
        enc = out["enc_outputs"]
        assert enc["pred_boxes"].shape[:2] == enc["pred_logits"].shape[:2]
    results = post(out, torch.tensor([[480, 640], [300, 400]]))
    assert [r["boxes"].shape for r in results] == [(100, 4)] * 2
    assert (results[1]["boxes"][:, 2:] >= results[1]["boxes"][:, :2]).all()


def _pad(srcs, padded_shapes, seed=1):
    """Pad each (1, C, h, w) map with large random values to (1, C, H, W) + its mask."""
    gen = torch.Generator().manual_seed(seed)
    out, masks = [], []
    for src, (H, W) in zip(srcs, padded_shapes):
        h, w = src.shape[-2:]
        padded = 10 * torch.randn(1, src.shape[1], H, W, generator=gen)
        padded[..., :h, :w] = src
        mask = torch.ones(1, H, W, dtype=torch.bool)
        mask[:, :h, :w] = False
        out.append(padded)
        masks.append(mask)
    return out, masks


@pytest.mark.parametrize("two_stage,refine,attention",
                         [(False, False, "deformable"), (False, True, "deformable"),
                          (True, True, "deformable"), (False, False, "dense"),
                          (True, True, "dense")])
def test_deformable_transformer_ignores_padding(two_stage, refine, attention):
    """What an image's queries see must not depend on its batch's padding: the same
    maps padded with garbage (masked) give the same decoder outputs and references."""
    torch.manual_seed(0)
    C, L = 32, 3
    tr = DeformableTransformer(C, 4, 2, 2, 64, 0.0, L, 2, 2, two_stage=two_stage,
                               two_stage_num_proposals=10, attention=attention).eval()
    box_heads = [MLP(C, C, 4, 3) for _ in range(2)] if refine else None
    proposal_heads = (torch.nn.Linear(C, 5), MLP(C, C, 4, 3)) if two_stage else None
    heads = dict(box_heads=box_heads, proposal_heads=proposal_heads)
    pe = PositionEmbeddingSine(C // 2)
    shapes, padded_shapes = [(8, 6), (4, 3), (2, 2)], [(11, 9), (6, 5), (3, 3)]
    srcs = [torch.randn(1, C, h, w) for h, w in shapes]
    masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in shapes]
    query_embed = None if two_stage else torch.randn(10, 2 * C)
    with torch.no_grad():
        hs, init_ref, refs, _, _ = tr(srcs, masks, [pe(m) for m in masks], query_embed,
                                      **heads)
        psrcs, pmasks = _pad(srcs, padded_shapes)
        phs, pinit_ref, prefs, _, _ = tr(psrcs, pmasks, [pe(m) for m in pmasks], query_embed,
                                         **heads)
    torch.testing.assert_close(phs, hs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pinit_ref, init_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefs, refs, atol=1e-5, rtol=1e-5)


def test_dense_transformer_ignores_padding():
    torch.manual_seed(0)
    C = 32
    tr = Transformer(C, 4, 2, 2, 64, 0.0).eval()
    pe = PositionEmbeddingSine(C // 2)
    src, mask = torch.randn(1, C, 5, 7), torch.zeros(1, 5, 7, dtype=torch.bool)
    query = torch.randn(6, C)
    with torch.no_grad():
        hs, _ = tr(src, mask, query, pe(mask))
        (psrc,), (pmask,) = _pad([src], [(8, 9)])
        phs, _ = tr(psrc, pmask, query, pe(pmask))
    torch.testing.assert_close(phs, hs, atol=1e-5, rtol=1e-5)


def test_position_encoding_without_normalize_codes_pixel_indices():
    """normalize=False (the official code's default): x = 1, 2, ... along a row, so the
    first two x channels are sin(x) and cos(x) (wavelength 2 pi)."""
    F, W = 8, 5
    pos = PositionEmbeddingSine(F, normalize=False)(torch.zeros(1, 3, W, dtype=torch.bool))
    x = torch.arange(1, W + 1, dtype=torch.float32)
    assert torch.allclose(pos[0, F, 1], x.sin()) and torch.allclose(pos[0, F + 1, 1], x.cos())
    normalized = PositionEmbeddingSine(F)(torch.zeros(1, 3, W, dtype=torch.bool))
    assert not torch.allclose(pos, normalized)
    with pytest.raises(ValueError, match="scale is only used with normalize=True"):
        PositionEmbeddingSine(F, normalize=False, scale=1.0)


def test_position_encoding_is_the_same_under_padding():
    pe = PositionEmbeddingSine(16)
    mask = torch.ones(1, 9, 12, dtype=torch.bool)
    mask[:, :6, :8] = False
    torch.testing.assert_close(pe(mask)[..., :6, :8],
                               pe(torch.zeros(1, 6, 8, dtype=torch.bool)))


def test_record_sampling():
    cfg = get_config("cpu", PLAIN)
    model, _, _ = build_model(cfg)
    images, masks = padded_batch()
    with record_sampling(model) as records:
        model(images, masks)
    assert len(records) == cfg.enc_layers + cfg.dec_layers
    rec = records[f"transformer.decoder.layers.{cfg.dec_layers - 1}.cross_attn"]
    M, L, K = cfg.n_heads, cfg.num_feature_levels, cfg.dec_n_points
    assert rec["sampling_locations"].shape == (2, cfg.num_queries, M, L, K, 2)
    assert rec["attention_weights"].shape == (2, cfg.num_queries, M, L, K)
    torch.testing.assert_close(rec["attention_weights"].sum((-1, -2)),
                               torch.ones(2, cfg.num_queries, M))
    assert rec["reference_points"].shape == (2, cfg.num_queries, L, 2)
    with torch.no_grad():
        model(images, masks)  # hooks are gone: nothing new is recorded
    assert len(records) == cfg.enc_layers + cfg.dec_layers


def test_bad_inputs_raise_value_error():
    model, _, _ = build_model(get_config("cpu", PLAIN))
    with pytest.raises(ValueError, match="masks"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(3, 64, 64), torch.zeros(3, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="architecture"):
        build_model(get_config("cpu", {"architecture": "yolo"}))


def test_overfit_one_batch():
    """A tiny model drives the total loss far down on one fixed batch."""
    torch.manual_seed(0)
    cfg = get_config("cpu", {**PLAIN, "d_model": 64, "n_heads": 4, "enc_layers": 1,
                             "dec_layers": 2, "dim_feedforward": 128, "num_queries": 10,
                             "num_classes": 4, "dropout": 0.0, "backbone": "resnet18"})
    model, criterion, _ = build_model(cfg)
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[1, :, 48:] = True
    images[1, :, :, 48:] = 0
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    history = []
    for _ in range(30):
        losses = criterion(model(images, masks), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.3 * history[0], history


def to_float(outputs):
    """The model's outputs (nested dicts and lists of tensors) cast to float32."""
    if isinstance(outputs, dict):
        return {k: to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [to_float(v) for v in outputs]
    return outputs.float()


@pytest.mark.parametrize("variant", ["two_stage", "detr"])
def test_whole_model_trains_under_bfloat16_autocast(variant):
    """Mixed precision (the engine's amp): every part accepts half-precision inputs
    next to float32 reference points, and the float32 losses have finite gradients."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(get_config("cpu", {**PLAIN, **VARIANTS[variant]}))
    images, masks = padded_batch()
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images, masks)
    assert outputs["pred_logits"].dtype == torch.bfloat16
    losses = criterion(to_float(outputs), targets)          # as the engine does
    loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("variant", ["multi_scale", "two_stage", "detr"])
def test_checkpoint_roundtrip_strict(tmp_path, variant):
    cfg = get_config("cpu", {**PLAIN, **VARIANTS[variant]})
    torch.manual_seed(0)
    model = build_model(cfg)[0].eval()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    torch.manual_seed(1)
    loaded = load_official_checkpoint(path, cfg)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    images, masks = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images[:1, :, :64, :64], masks[:1, :64, :64]),
                                   model(images[:1, :, :64, :64], masks[:1, :64, :64]))


def test_checkpoint_mismatch_lists_keys(tmp_path):
    cfg = get_config("cpu", PLAIN)
    model = build_model(cfg)[0]
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["transformer.level_embed"]
    state["query_embed.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_strict(build_model(cfg)[0], state)
    message = str(info.value)
    assert "extra.weight" in message and "transformer.level_embed" in message
    assert "query_embed.weight" in message
    assert info.value.missing == ["transformer.level_embed"]
    assert info.value.unexpected == ["extra.weight"]
    # a two-stage checkpoint does not fit the plain model
    path = tmp_path / "two_stage.pth"
    two_stage = build_model(get_config("cpu", {**PLAIN, "two_stage": True}))[0]
    torch.save(two_stage.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="transformer.enc_output.weight"):
        load_official_checkpoint(path, cfg)


def test_backbone_from_scratch_uses_group_norm_and_trains_every_stage():
    paper = Backbone("resnet18", norm="frozen_bn")
    scratch = Backbone("resnet18", norm="group_norm")
    assert any(isinstance(m, FrozenBatchNorm2d) for m in paper.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in scratch.modules())
    frozen = [n for n, p in paper.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("body.conv1", "body.layer1")) for n in frozen)
    assert all(p.requires_grad for p in scratch.parameters())
    # each residual block starts as the identity: its last norm has zero scale
    assert scratch.body.layer2[0].bn2.weight.abs().max() == 0
    with pytest.raises(ValueError, match="backbone_norm must be one of"):
        Backbone("resnet18", norm="batch")


@pytest.mark.parametrize("name, channels", [("resnet18", [128, 256, 512]),
                                            ("regnet_x_400mf", [64, 160, 400])])
def test_backbone_families_give_strides_8_16_32_with_their_channels(name, channels):
    net = Backbone(name, norm="batch_norm")
    images, mask = torch.randn(2, 3, 96, 64), torch.zeros(2, 96, 64, dtype=torch.bool)
    mask[1, :, 32:] = True
    out = net(images, mask)
    assert net.num_channels == channels and net.strides == [8, 16, 32]
    for (feature, m), ch, stride in zip(out, channels, net.strides):
        assert feature.shape == (2, ch, 96 // stride, 64 // stride)
        assert m.shape == (2, *feature.shape[-2:]) and m.dtype == torch.bool
        assert m[1].any() and not m[0].any()
    assert all(p.requires_grad for p in net.parameters())      # from scratch: all train
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in net.modules())
    c5 = Backbone(name, norm="frozen_bn", return_interm_layers=False)
    assert c5.num_channels == channels[-1:] and c5.strides == [32]
    frozen = {n.split(".")[1] for n, p in c5.named_parameters() if not p.requires_grad}
    assert frozen == ({"conv1", "layer1"} if name == "resnet18" else {"stem", "block1"})


def test_backbone_rejects_unknown_names_and_dilated_regnets():
    with pytest.raises(ValueError, match="backbone must be one of .*got 'resnet19'"):
        Backbone("resnet19")
    with pytest.raises(ValueError, match="dilation=True needs a ResNet"):
        Backbone("regnet_x_400mf", dilation=True)


# --- the same numbers as before a refactoring -----------------------------------------

@pytest.fixture(scope="module")
def recorded():
    return torch.load(recording.DATA / "model_outputs.pt")


@pytest.mark.parametrize("preset", recording.PAPER_PRESETS)
def test_paper_state_dict_keys_are_the_recorded_ones(recorded, preset):
    """Same names, same order as recorded in tests/data/model_outputs.pt."""
    keys = list(build_model(get_config(preset))[0].state_dict())
    assert keys == recorded["state_dict_keys"][preset]


@pytest.mark.parametrize("variant", sorted(recording.VARIANTS))
def test_outputs_match_recording(recorded, variant):
    """A small seeded model of every variant computes what the code computed when
    tests/data/model_outputs.pt was recorded: bit for bit on the processor and torch of
    the recording, to rounding elsewhere (another CPU's kernels order float sums
    differently; the file records the processor since 2026-12, so an older file is
    compared to rounding everywhere)."""
    model = recording.small_model(variant)
    assert list(model.state_dict()) == recorded["state_dict_keys"][variant]
    images, masks = recording.small_inputs()
    with torch.no_grad():
        outputs = recording.flat_outputs(model(images, masks))
    expected = recorded["outputs"][variant]
    assert sorted(outputs) == sorted(expected)
    same_platform = ((recorded["torch"], recorded["machine"], recorded.get("cpu"))
                     == (str(torch.__version__), platform.machine(),
                         machine_description("cpu")["cpu"]))
    for key, value in expected.items():
        if same_platform:
            assert torch.equal(outputs[key], value), key
        else:
            torch.testing.assert_close(outputs[key], value, rtol=1e-4, atol=1e-5)
