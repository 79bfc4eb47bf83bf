"""Hugging Face DeformableDetrForObjectDetection folders, checked against transformers
itself: models built by transformers (random weights, no download, the backbone without
pretrained weights) load into ddetr and compute what transformers computes on the same
padded batch; ddetr models written as folders load with from_pretrained and compute
what ddetr computes; configurations ddetr cannot build are refused naming the key."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")      # a test dependency (pyproject's dev extra)
from safetensors.torch import save_file  # noqa: E402
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection  # noqa: E402

from ddetr.config import get_config  # noqa: E402
from ddetr.engine import load_trained  # noqa: E402
from ddetr.engine.checkpoint import CheckpointError  # noqa: E402
from ddetr.engine.huggingface import save_huggingface  # noqa: E402
from ddetr.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# float32 through a ResNet-18, one encoder and two decoder layers: the two libraries
# order some sums differently (measured: 3e-7 at most); 1e-5 leaves room, and a wrong
# weight moves the outputs by 1e-2 and more
TOL = 1e-5
VARIANTS = {"plain": (False, False), "refinement": (True, False), "two-stage": (True, True)}
# transformers' own ResNet (use_timm_backbone=False), as a ResNet-18
HF_RESNET18 = {"model_type": "resnet", "depths": [2, 2, 2, 2], "layer_type": "basic",
               "hidden_sizes": [64, 128, 256, 512], "out_features": ["stage2", "stage3", "stage4"]}


def hf_model(refine, two_stage, backbone="timm", seed=0, **changes):
    """A transformers model with random weights: transformers' own initialisation, then
    noise on every parameter (its zero-initialised attention offsets and weights would
    hide a wrong name) and random batch-norm statistics. The two-stage encoder-output
    biases stay zero, so that padded tokens score exactly the class bias and the top
    proposals come from the image (see ``padded_tokens_in_top_k``)."""
    torch.manual_seed(seed)
    kw = ({"backbone": "resnet18", "use_pretrained_backbone": False} if backbone == "timm"
          else {"use_timm_backbone": False, "backbone_config": HF_RESNET18})
    config = DeformableDetrConfig(d_model=64, encoder_layers=1, decoder_layers=2,
                                  encoder_ffn_dim=96, decoder_ffn_dim=96, num_queries=10,
                                  two_stage_num_proposals=10, with_box_refine=refine,
                                  two_stage=two_stage, num_labels=5, dropout=0.0,
                                  **kw, **changes)
    model = DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("enc_output.bias", "enc_output_norm.bias")):
                p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return model


def padded_batch():
    """Two images, the second padded at the bottom and right: (images, ddetr's mask
    (True = padding), transformers' pixel_mask (1 = pixel))."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 160, 192, generator=gen)
    padding = torch.zeros(2, 160, 192, dtype=torch.bool)
    padding[1, 120:] = True
    padding[1, :, 150:] = True
    images[padding[:, None].expand_as(images)] = 0
    return images, padding, (~padding).long()


def padded_tokens_in_top_k(outputs, hf, padding):
    """How many padded tokens transformers' two-stage top-k picked (ddetr never picks
    one; the outputs can be compared only where transformers did not either)."""
    masks = [torch.nn.functional.interpolate(padding[None].float(), size=s).bool()[0]
             for s in [(20, 24), (10, 12), (5, 6), (3, 3)]]        # 160x192 at 8..64
    flat = torch.cat([m.flatten(1) for m in masks], 1)
    top = outputs.enc_outputs_class[..., 0].topk(hf.config.two_stage_num_proposals, 1)[1]
    return int(flat.gather(1, top).sum())


def compare(hf_out, ddetr_out):
    return (float((hf_out.logits - ddetr_out["pred_logits"]).abs().max()),
            float((hf_out.pred_boxes - ddetr_out["pred_boxes"]).abs().max()))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_transformers_folder_loads_and_computes_the_same(tmp_path, variant):
    hf = hf_model(*VARIANTS[variant])
    hf.save_pretrained(tmp_path / "hf")
    model, post, cfg, categories = load_trained(tmp_path / "hf")        # the entry point
    assert (cfg.with_box_refine, cfg.two_stage) == VARIANTS[variant]
    assert (cfg.backbone, cfg.d_model, cfg.enc_layers, cfg.dec_layers, cfg.num_queries,
            cfg.num_classes, cfg.num_feature_levels) == ("resnet18", 64, 1, 2, 10, 5, 4)
    assert categories == {i: f"LABEL_{i}" for i in range(5)}
    images, padding, pixel_mask = padded_batch()
    with torch.no_grad():
        expected = hf(pixel_values=images, pixel_mask=pixel_mask)
        got = model(images, padding)
    if variant == "two-stage":
        assert padded_tokens_in_top_k(expected, hf, padding) == 0
        assert torch.allclose(expected.enc_outputs_class, got["enc_outputs"]["pred_logits"],
                              atol=TOL)
    logits, boxes = compare(expected, got)
    assert logits < TOL and boxes < TOL, (logits, boxes)
    assert float(expected.logits.std()) > 0.1      # the outputs vary: a real comparison


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_ddetr_model_written_as_a_folder_loads_in_transformers(tmp_path, variant):
    refine, two_stage = VARIANTS[variant]
    torch.manual_seed(2)
    cfg = get_config("paper", {"backbone": "resnet18", "d_model": 64, "enc_layers": 1,
                               "dec_layers": 2, "dim_feedforward": 96, "num_queries": 10,
                               "num_classes": 5, "with_box_refine": refine,
                               "two_stage": two_stage, "dropout": 0.0})
    model = build_model(cfg)[0].eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("enc_output.bias", "enc_output_norm.bias")):
                p.add_(torch.randn_like(p) * 0.05)
            else:                             # as in hf_model: padded tokens score low
                p.zero_()
    save_huggingface(model, cfg, {1: "circle", 2: "square"}, tmp_path / "out")
    hf = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "out").eval()
    assert hf.config.id2label == {0: "N/A", 1: "circle", 2: "square", 3: "N/A", 4: "N/A"}
    images, padding, pixel_mask = padded_batch()
    with torch.no_grad():
        expected = model(images, padding)
        got = hf(pixel_values=images, pixel_mask=pixel_mask)
    if variant == "two-stage":
        assert padded_tokens_in_top_k(got, hf, padding) == 0
    logits, boxes = compare(got, expected)
    assert logits < TOL and boxes < TOL, (logits, boxes)
    # and back: the folder is one of ddetr's checkpoint kinds
    again, _, cfg2, categories = load_trained(tmp_path / "out")
    assert categories == {1: "circle", 2: "square"}
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_transformers_own_resnet_backbone_loads_too(tmp_path):
    hf = hf_model(False, False, backbone="resnet")
    hf.save_pretrained(tmp_path / "hf")
    model, _, cfg, _ = load_trained(tmp_path / "hf")
    assert cfg.backbone == "resnet18"
    images, padding, pixel_mask = padded_batch()
    with torch.no_grad():
        logits, boxes = compare(hf(pixel_values=images, pixel_mask=pixel_mask),
                                model(images, padding))
    assert logits < TOL and boxes < TOL


def test_a_dilated_backbone_loads_as_dc5(tmp_path):
    """dilation=True (timm's output_stride 16; a ResNet-50, as ResNet-18's basic blocks
    cannot dilate) is ddetr's dilation=True: C5 at stride 16."""
    torch.manual_seed(3)
    config = DeformableDetrConfig(backbone="resnet50", use_pretrained_backbone=False,
                                  dilation=True, d_model=64, encoder_layers=1,
                                  decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  num_queries=10, num_labels=5, dropout=0.0)
    hf = DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    model, _, cfg, _ = load_trained(tmp_path / "hf")
    assert cfg.dilation and model.backbone.strides == [8, 16, 16]
    images, padding, pixel_mask = padded_batch()
    with torch.no_grad():
        logits, boxes = compare(hf(pixel_values=images, pixel_mask=pixel_mask),
                                model(images, padding))
    assert logits < TOL and boxes < TOL


def test_transformers_in_memory_names_load_too(tmp_path):
    """transformers 5 renames some weights in memory (backbone.model, mlp.fc1, o_proj);
    a file written from its state_dict is read as well."""
    hf = hf_model(True, False)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    assert any(".mlp.fc1." in k for k in state) and any(".o_proj." in k for k in state)
    save_file(state, folder / "model.safetensors")
    model, *_ = load_trained(folder)
    images, padding, pixel_mask = padded_batch()
    with torch.no_grad():
        logits, boxes = compare(hf(pixel_values=images, pixel_mask=pixel_mask),
                                model(images, padding))
    assert logits < TOL and boxes < TOL


def test_a_missing_weight_is_named(tmp_path):
    hf = hf_model(False, False)
    hf.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file
    state = load_file(tmp_path / "hf" / "model.safetensors")
    del state["model.decoder.layers.1.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\).*: model\.decoder\.layers\.1"
                                              r"\.self_attn\.k_proj\.weight"):
        load_trained(tmp_path / "hf")


def write_config(folder, **changes):
    """A folder whose config.json is transformers' own, with some keys changed."""
    config = DeformableDetrConfig(backbone="resnet18", use_pretrained_backbone=False,
                                  d_model=64, encoder_layers=1, decoder_layers=1)
    config.save_pretrained(folder)
    values = json.loads((folder / "config.json").read_text())
    values.update(changes)
    (folder / "config.json").write_text(json.dumps(values))
    return folder


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ddetr", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("changes, message", [
    ({"activation_function": "gelu"}, "activation_function='gelu' is not supported by ddetr "
                                      "(expected 'relu')"),
    ({"position_embedding_type": "learned"}, "position_embedding_type='learned'"),
    ({"decoder_attention_heads": 4}, "decoder_attention_heads=4 is not supported by ddetr "
                                     "(expected encoder_attention_heads=8"),
    ({"backbone_config": {"model_type": "timm_backbone", "backbone": "resnet101"}},
     "backbone='resnet101' is not supported by ddetr (expected one of ['resnet18', "
     "'resnet34', 'resnet50'])"),
    ({"model_type": "detr"}, "model_type must be 'deformable_detr'"),
])
def test_an_unsupported_configuration_is_one_line_naming_the_key(tmp_path, changes, message):
    write_config(tmp_path / "hf", **changes)
    r = cli("evaluate", "--checkpoint", "hf", "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m ddetr evaluate: error: ")
    assert message in lines[0], lines[0]


def test_a_model_transformers_cannot_build_is_refused_before_writing(tmp_path):
    model, _, _ = build_model(get_config("cpu"))
    with pytest.raises(ValueError, match="backbone='regnet_x_400mf' has no Hugging Face"):
        save_huggingface(model, get_config("cpu"), {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    small = get_config("paper", {"backbone": "resnet18", "d_model": 64, "enc_layers": 1,
                                 "dec_layers": 1})
    with pytest.raises(FileExistsError, match="is not an empty folder"):
        save_huggingface(build_model(small)[0], small, {}, tmp_path / "full")


@pytest.mark.slow
def test_demo_and_export_take_a_transformers_folder(tmp_path):
    hf = hf_model(True, True)
    hf.save_pretrained(tmp_path / "hf")
    Image.new("RGB", (120, 100), (40, 120, 200)).save(tmp_path / "img.png")
    r = cli("demo", "--checkpoint", "hf", "--image", "img.png", "--threshold", "0",
            "--device", "cpu", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "img_det.png").is_file() and "LABEL_" in r.stdout
    r = cli("export", "--checkpoint", "hf", "--format", "huggingface", "--out", "again",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    again = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "again").eval()
    images, padding, pixel_mask = padded_batch()
    with torch.no_grad():
        a = hf(pixel_values=images, pixel_mask=pixel_mask)
        b = again(pixel_values=images, pixel_mask=pixel_mask)
    assert torch.allclose(a.logits, b.logits, atol=TOL)
    assert torch.allclose(a.pred_boxes, b.pred_boxes, atol=TOL)


def test_a_head_whose_decoder_copy_differs_is_refused(tmp_path):
    """ddetr holds a refinement head and the decoder's copy of it as one tensor; a file
    whose two copies differ cannot be loaded faithfully."""
    hf = hf_model(True, False)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["model.decoder.bbox_embed.1.layers.0.weight"] += 1
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r": model\.decoder\.bbox_embed\.1\.layers\.0\."
                                              r"weight and bbox_embed\.1\.layers\.0\.weight "
                                              r"differ, but ddetr holds them as one tensor"):
        load_trained(folder)
