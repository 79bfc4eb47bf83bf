"""Hugging Face ``DeformableDetrForObjectDetection`` folders, read into ddetr and written.

A folder as ``save_pretrained`` writes it (and as the Hub serves it): ``config.json``
and the weights, ``model.safetensors`` (or an older ``pytorch_model.bin``).

Reading maps the config onto a ddetr Config and the weights onto ddetr's parameter
names (those of the official release), then loads them strictly:

    config.json                          ddetr Config
    num_feature_levels, d_model          num_feature_levels, d_model
    encoder/decoder_layers               enc_layers, dec_layers
    encoder/decoder_attention_heads      n_heads (the two must agree)
    encoder/decoder_ffn_dim              dim_feedforward (the two must agree)
    encoder/decoder_n_points             enc_n_points, dec_n_points
    num_queries (two_stage_num_proposals when two_stage)   num_queries
    id2label (its size is num_labels)    num_classes, and the category names
    with_box_refine, two_stage, dropout  the same keys
    backbone: timm "resnet18/34/50" (use_timm_backbone, as on the Hub) or a
      transformers ResNetConfig of those depths      backbone, dilation (DC5)

A configuration ddetr cannot build (another activation, learned position embeddings,
a ResNet-101 backbone, ...) is refused in one line that names the key.

Weights: ``model.encoder.layers.{i}.self_attn`` is ddetr's
``transformer.encoder.layers.{i}.self_attn`` (MSDeformAttn has the same submodules),
``fc1``/``fc2`` are ``linear1``/``linear2``, the layer norms are renamed after what
they follow, the decoder's self-attention ``q_proj``, ``k_proj``, ``v_proj`` are the
rows of ``in_proj_weight``, and the backbone is torchvision's ResNet under either
naming (timm's is torchvision's; transformers' own ResNet is renamed). transformers
saves tied weights once (the shared heads of the plain model, and in transformers 5
the class heads of the refinement-only model): a head the file leaves out is the
first one, as transformers itself ties it. Both key spellings are read: the one
``save_pretrained`` writes (``backbone.conv_encoder``, ``fc1``, ``out_proj``) and
transformers 5's in-memory one (``backbone.model``, ``mlp.fc1``, ``o_proj``).

Writing goes the other way: ``save_huggingface`` writes config.json (a timm ResNet
backbone without pretrained weights, as the Hub's checkpoints have it) and
model.safetensors, which ``DeformableDetrForObjectDetection.from_pretrained`` loads.
ddetr models transformers cannot build are refused: RegNet backbones (timm's
RegNetX-400MF is not torchvision's: its last stage has 384 channels, not 400), a
group-norm backbone, DAB anchors, dense attention.

One difference in behaviour stays: in the two-stage model, transformers (like the
official code) may pick padded tokens of a padded batch as proposals; ddetr never does.
On unpadded images, and whenever no padded token scores among the top proposals, the
two compute the same.
"""
import json
import re
from pathlib import Path

import torch

from ..models import build_model
from ..models.backbone import RESNETS
from .checkpoint import (CheckpointError, CheckpointMismatchError, checkpoint_config,
                         load_state_dict_strict, read_file)

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CONFIG = "config.json"
NO_NAME = "N/A"          # id2label's entry for an id without a category (as on the Hub)

# ResNet depths of ddetr's backbones, as transformers' ResNetConfig spells them
RESNET_DEPTHS = {"resnet18": ([2, 2, 2, 2], "basic"), "resnet34": ([3, 4, 6, 3], "basic"),
                 "resnet50": ([3, 4, 6, 3], "bottleneck")}


def is_huggingface_folder(path):
    """Whether path is a folder with a config.json (a transformers model folder)."""
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


# --- config.json -> ddetr Config ------------------------------------------------------------
def read_hf_config(folder):
    """The dict in folder/config.json; it must describe DeformableDetrForObjectDetection."""
    path = Path(folder) / CONFIG
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON config ({e})") from e
    if not isinstance(hf, dict) or hf.get("model_type") != "deformable_detr":
        kind = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise CheckpointError(f"{path}: model_type must be 'deformable_detr' "
                              f"(DeformableDetrForObjectDetection), got {kind!r}")
    return hf


def _refuse(folder, key, value, expected):
    raise CheckpointError(f"Hugging Face config {Path(folder) / CONFIG}: {key}={value!r} "
                          f"is not supported by ddetr (expected {expected})")


def _same(hf, folder, a, b, default):
    """hf[a], which must equal hf[b] (ddetr has one value for both)."""
    if hf.get(a, default) != hf.get(b, default):
        _refuse(folder, b, hf.get(b, default), f"{a}={hf.get(a, default)!r}: ddetr has one "
                f"value for both")
    return hf.get(a, default)


def hf_backbone(hf, folder):
    """(ddetr backbone name, dilation, kind) of a config: kind "timm" (timm's ResNet,
    torchvision's names) or "resnet" (transformers' ResNetBackbone)."""
    sub = hf.get("backbone_config") or {}
    levels = hf.get("num_feature_levels", 4)
    if sub.get("model_type") == "resnet":
        depths, layer = sub.get("depths"), sub.get("layer_type", "bottleneck")
        name = next((n for n, d in RESNET_DEPTHS.items() if d == (depths, layer)), None)
        if name is None:
            _refuse(folder, "backbone_config.depths", depths, f"the depths of "
                    f"{list(RESNET_DEPTHS)}: {[d for d, _ in RESNET_DEPTHS.values()]}")
        for key, good in (("downsample_in_bottleneck", False), ("hidden_act", "relu"),
                          ("embedding_size", 64), ("num_channels", 3)):
            if sub.get(key, good) != good:
                _refuse(folder, f"backbone_config.{key}", sub.get(key), repr(good))
        return name, False, "resnet"
    if sub and sub.get("model_type") != "timm_backbone":
        _refuse(folder, "backbone_config.model_type", sub.get("model_type"),
                "'timm_backbone' or 'resnet'")
    if not sub and hf.get("use_timm_backbone", True) is False:
        _refuse(folder, "use_timm_backbone", False, "a backbone_config with it")
    name = sub.get("backbone") or hf.get("backbone") or "resnet50"
    if name not in RESNETS:
        _refuse(folder, "backbone", name, f"one of {list(RESNETS)}")
    indices = sub.get("out_indices")
    wanted = [2, 3, 4] if levels > 1 else [4]
    if indices is not None and list(indices) != wanted:
        _refuse(folder, "backbone_config.out_indices", indices, wanted)
    dilation = bool(hf.get("dilation")) or sub.get("output_stride") == 16
    return name, dilation, "timm"


def config_values(hf, folder):
    """(ddetr Config values, categories {id: name}) of a Hugging Face config dict."""
    for key, good in (("activation_function", "relu"), ("position_embedding_type", "sine"),
                      ("num_channels", 3)):
        if hf.get(key, good) != good:
            _refuse(folder, key, hf.get(key), repr(good))
    backbone, dilation, _ = hf_backbone(hf, folder)
    two_stage = bool(hf.get("two_stage", False))
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
    values = {
        "backbone": backbone, "dilation": dilation, "backbone_norm": "frozen_bn",
        "num_feature_levels": hf.get("num_feature_levels", 4), "d_model": hf.get("d_model", 256),
        "n_heads": _same(hf, folder, "encoder_attention_heads", "decoder_attention_heads", 8),
        "enc_layers": hf.get("encoder_layers", 6), "dec_layers": hf.get("decoder_layers", 6),
        "dim_feedforward": _same(hf, folder, "encoder_ffn_dim", "decoder_ffn_dim", 1024),
        "enc_n_points": hf.get("encoder_n_points", 4),
        "dec_n_points": hf.get("decoder_n_points", 4),
        "num_queries": hf.get("two_stage_num_proposals", 300) if two_stage
        else hf.get("num_queries", 300),
        "num_classes": len(id2label), "with_box_refine": bool(hf.get("with_box_refine")),
        "two_stage": two_stage, "dropout": hf.get("dropout", 0.1),
    }
    categories = {int(k): v for k, v in id2label.items() if v != NO_NAME}
    return values, categories


# --- names: ddetr <-> Hugging Face ----------------------------------------------------------
# ddetr name -> Hugging Face name as save_pretrained writes it; the first match wins.
# (The backbone, the heads and the decoder's self-attention input rows have their own
# functions below.)
RENAMES = [
    (r"input_proj\.(.+)", r"model.input_proj.\1"),
    (r"query_embed\.weight", r"model.query_position_embeddings.weight"),
    (r"transformer\.(level_embed|reference_points\..+|enc_output.*|pos_trans.*)", r"model.\1"),
    (r"transformer\.(en|de)coder\.layers\.(\d+)\.linear([12])\.(.+)",
     r"model.\1coder.layers.\2.fc\3.\4"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)",
     r"model.encoder.layers.\1.self_attn.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm1\.(.+)",
     r"model.encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm2\.(.+)",
     r"model.encoder.layers.\1.final_layer_norm.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.(.+)",
     r"model.decoder.layers.\1.encoder_attn.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)",
     r"model.decoder.layers.\1.self_attn.out_proj.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm1\.(.+)",
     r"model.decoder.layers.\1.encoder_attn_layer_norm.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.(.+)",
     r"model.decoder.layers.\1.self_attn_layer_norm.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.(.+)",
     r"model.decoder.layers.\1.final_layer_norm.\2"),
]
BACKBONE = "model.backbone.conv_encoder.model."
# transformers 5's in-memory spelling -> the spelling save_pretrained writes
SPELLINGS = [(r"^model\.backbone\.model\.", BACKBONE), (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
             (r"\.layers\.(\d+)\.mlp\.fc([12])\.", r".layers.\1.fc\2.")]
IN_PROJ = re.compile(r"transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)")
HEAD = re.compile(r"(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)")


def resnet_name(rest, kind):
    """A torchvision ResNet parameter name (conv1.weight, layer2.0.bn1.bias, ...) in the
    backbone's naming: timm's is the same; transformers' ResNet has its own."""
    if kind == "timm":
        return rest
    m = re.fullmatch(r"(conv|bn)1\.(.+)", rest)
    if m:
        return f"embedder.embedder.{'convolution' if m[1] == 'conv' else 'normalization'}.{m[2]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)", rest)
    if m:
        part = "convolution" if m[3] == "conv" else "normalization"
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[4]) - 1}.{part}.{m[5]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(.+)", rest)
    if m:
        part = "convolution" if m[3] == "0" else "normalization"
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.{part}.{m[4]}"
    raise CheckpointError(f"no Hugging Face name for backbone parameter {rest}")


def hf_names(key, kind="timm"):
    """The Hugging Face names (as save_pretrained writes them) that hold ddetr parameter
    ``key``: one name, the three q/k/v names for ``in_proj_*``, or for a head the
    names to try in order (top level, the decoder's copy, the first head when the
    file ties the heads)."""
    if key.startswith("backbone.0.body."):
        return [BACKBONE + resnet_name(key[len("backbone.0.body."):], kind)]
    m = IN_PROJ.fullmatch(key)
    if m:
        return [f"model.decoder.layers.{m[1]}.self_attn.{p}_proj.{m[2]}" for p in "qkv"]
    m = HEAD.fullmatch(key)
    if m:
        head, i, rest = m.groups()
        names = [f"{head}.{i}.{rest}", f"model.decoder.{head}.{i}.{rest}"]
        if key.startswith("transformer.decoder."):     # the decoder's copy, if the file has it
            names.reverse()
        return names + [f"{head}.0.{rest}"]
    for pattern, template in RENAMES:
        if re.fullmatch(pattern, key):
            return [re.sub(pattern, template, key)]
    raise CheckpointError(f"no Hugging Face name for ddetr parameter {key}")


def respell(name):
    """A Hugging Face name in the spelling save_pretrained writes."""
    for pattern, replacement in SPELLINGS:
        name = re.sub(pattern, replacement, name)
    return name


def from_hf_state(hf_state, own, kind, source):
    """ddetr state dict for the model state dict ``own`` (its keys, and which of them are
    one tensor), taken from a Hugging Face state dict.

    Raises CheckpointMismatchError naming the Hugging Face names that are missing and
    those the file has that ddetr does not use (batch-norm step counters aside), and
    CheckpointError where the file holds two different values for what is one tensor in
    ddetr (a head and the decoder's copy of it)."""
    keys = list(own)
    hf_state = {respell(k): v for k, v in hf_state.items()}
    state, used, missing = {}, set(), []
    for key in keys:
        names = hf_names(key, kind)
        if IN_PROJ.fullmatch(key):
            if all(n in hf_state for n in names):
                state[key] = torch.cat([hf_state[n] for n in names])
                used.update(names)
            else:
                missing += [n for n in names if n not in hf_state]
            continue
        name = next((n for n in names if n in hf_state), None)
        if name is None:
            missing.append(names[0])
            continue
        state[key] = hf_state[name]
        used.add(name)
    unexpected = [k for k in hf_state if k not in used and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointMismatchError(missing, unexpected, [], source)
    first = {}                               # storage -> the first key that holds it
    for key, value in own.items():
        other = first.setdefault(value.data_ptr(), key)
        if other != key and not torch.equal(state[key], state[other]):
            raise CheckpointError(f"{source}: {hf_names(other, kind)[0]} and "
                                  f"{hf_names(key, kind)[0]} differ, but ddetr holds them "
                                  f"as one tensor ({other})")
    return state


TRAINING_ONLY = ("label_enc.",)   # ddetr.models.denoising: not part of the detector


def to_hf_state(state):
    """Hugging Face state dict (save_pretrained's names, timm backbone) of a ddetr one:
    contiguous copies, batch-norm step counters and training-only weights (the label
    table of DN-DETR's denoising queries) left out."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key.startswith(TRAINING_ONLY):
            continue
        names = hf_names(key)
        if IN_PROJ.fullmatch(key):
            for name, part in zip(names, value.chunk(3)):
                out[name] = part.detach().clone().contiguous()
        else:
            out[names[0]] = value.detach().clone().contiguous()
    return out


# --- reading a folder -------------------------------------------------------------------------
def read_hf_weights(folder):
    """The state dict in a folder: model.safetensors, else pytorch_model.bin."""
    folder = Path(folder)
    for name in WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file   # only Hugging Face folders need it
            try:
                return load_file(path)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds
                raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
        return read_file(path)
    raise FileNotFoundError(f"Hugging Face folder {folder} has no weights: expected one of "
                            f"{list(WEIGHTS)} (sharded checkpoints are not supported)")


def load_huggingface(folder, overrides=None, config=None):
    """(model in eval mode on the CPU, postprocessor, cfg, categories) from a Hugging
    Face DeformableDetrForObjectDetection folder, loaded strictly.

    overrides: as for ddetr's checkpoints (e.g. data_path); the model's keys come from
    config.json and cannot change. config must be None (the folder has its own)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    values, categories = config_values(hf, folder)
    _, _, kind = hf_backbone(hf, folder)
    cfg = checkpoint_config({"config": values}, folder, config, overrides)
    model, _, postprocessor = build_model(cfg)
    source = f"Hugging Face folder {folder}"
    state = from_hf_state(read_hf_weights(folder), model.state_dict(), kind, source)
    load_state_dict_strict(model, state, source=source)
    return model.eval(), postprocessor, cfg, categories


# --- writing a folder -------------------------------------------------------------------------
def hf_config(cfg, categories=None):
    """The config.json dict of a ddetr Config (refused, naming the key, where
    transformers' DeformableDetr cannot build the model)."""
    checks = [("architecture", "deformable_detr"), ("attention", "deformable"),
              ("query_anchors", "none")]
    for key, good in checks:
        if getattr(cfg, key) != good:
            raise ValueError(f"{key}={getattr(cfg, key)!r} has no Hugging Face "
                             f"DeformableDetr counterpart (it needs {key}={good!r})")
    if cfg.backbone not in RESNETS:
        raise ValueError(f"backbone={cfg.backbone!r} has no Hugging Face counterpart (it needs "
                         f"one of {list(RESNETS)}; timm's RegNets differ from torchvision's)")
    if cfg.backbone_norm == "group_norm":
        raise ValueError("backbone_norm='group_norm' has no Hugging Face counterpart "
                         "(its backbone has batch norm)")
    if cfg.two_stage and not cfg.with_box_refine:
        raise ValueError("two_stage=True without with_box_refine has no Hugging Face "
                         "counterpart (transformers requires both)")
    categories = categories or {}
    id2label = {str(i): categories.get(i, NO_NAME) for i in range(cfg.num_classes)}
    return {
        "architectures": ["DeformableDetrForObjectDetection"], "model_type": "deformable_detr",
        "use_timm_backbone": True, "backbone": cfg.backbone, "use_pretrained_backbone": False,
        "dilation": cfg.dilation, "num_channels": 3, "num_feature_levels": cfg.num_feature_levels,
        "d_model": cfg.d_model, "encoder_layers": cfg.enc_layers,
        "decoder_layers": cfg.dec_layers, "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads, "encoder_ffn_dim": cfg.dim_feedforward,
        "decoder_ffn_dim": cfg.dim_feedforward, "encoder_n_points": cfg.enc_n_points,
        "decoder_n_points": cfg.dec_n_points, "num_queries": cfg.num_queries,
        "two_stage_num_proposals": cfg.num_queries, "with_box_refine": cfg.with_box_refine,
        "two_stage": cfg.two_stage, "dropout": cfg.dropout, "activation_function": "relu",
        "position_embedding_type": "sine", "id2label": id2label,
        "label2id": {name: int(i) for i, name in id2label.items() if name != NO_NAME},
    }


def save_huggingface(model, cfg, categories, folder):
    """Write model as a Hugging Face folder (config.json + model.safetensors) that
    ``DeformableDetrForObjectDetection.from_pretrained(folder)`` loads (with timm
    installed, for the backbone). The folder must be new or empty."""
    from safetensors.torch import save_file
    config = hf_config(cfg, categories)           # refused before anything is written
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder; choose a new "
                              f"--out folder")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state(model.state_dict()), folder / WEIGHTS[0], metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder
