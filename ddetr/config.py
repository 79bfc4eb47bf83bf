"""One flat configuration for model, loss, data and training, and its presets.

A preset is a name for a set of values; a run is a preset plus overrides, given as a
dict, as ``key=value`` strings (the CLI), or as a YAML file of keys. A key that does
not exist is an error that names it, so a typo never silently trains the wrong model.

    cfg = get_config("cpu", {"epochs": 2})
    cfg = get_config("paper", ["two_stage=true", "with_box_refine=true"])
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Config:
    # --- model -----------------------------------------------------------------------
    architecture: str = "deformable_detr"  # or "detr" (dense attention baseline)
    backbone: str = "resnet50"             # resnet18/34/50 | regnet_x_400mf/800mf | regnet_y_400mf
    backbone_weights: str | None = None    # path to a torchvision ResNet state dict
    backbone_norm: str = "frozen_bn"       # frozen_bn (pretrained) | group_norm, batch_norm (scratch)
    dilation: bool = False
    num_feature_levels: int = 4            # 1 = single scale (C5 only)
    d_model: int = 256
    n_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300
    num_classes: int = 91                  # COCO's category ids run to 90
    with_box_refine: bool = False
    two_stage: bool = False
    query_anchors: str = "none"            # "dab": learned 4-d anchor boxes as queries
                                           # (DAB-DETR style; needs with_box_refine)
    aux_loss: bool = True
    attention_backend: str = "auto"        # ddetr.ops.ms_deform_attn backend
    # --- matcher and loss ------------------------------------------------------------
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    # --- data ------------------------------------------------------------------------
    dataset: str = "coco"                  # "coco" (any COCO-format folder) | "synthetic"
    data_path: str = "data/coco"
    train_scales: list = field(default_factory=lambda: [480, 512, 544, 576, 608, 640,
                                                        672, 704, 736, 768, 800])
    max_size: int = 1333
    val_scale: int = 800
    num_workers: int = 2
    synthetic_train_images: int = 2000    # size of the generated set (dataset=synthetic)
    synthetic_val_images: int = 200
    synthetic_image_size: int = 256
    synthetic_seed: int = 0
    # --- optimisation ------------------------------------------------------------------
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1       # sampling_offsets and reference_points
    weight_decay: float = 1e-4
    batch_size: int = 2                    # per process
    epochs: int = 50
    lr_drop: int = 40
    clip_max_norm: float = 0.1
    amp: bool = False                      # mixed precision: CUDA, or CPUs with native bf16
    seed: int = 42
    device: str = "auto"                   # auto | cpu | cuda
    output_dir: str = "runs/default"
    eval_every: int = 1                    # epochs between COCO evaluations
    iters_per_epoch: int = 0               # 0 = whole epoch; >0 caps it (quick runs)
    time_limit_min: float = 0.0            # >0: stop training after this many minutes,
                                           # then evaluate and save (a fixed budget)
    tensorboard: bool = False              # also log to output_dir (needs tensorboard)
    find_unused_parameters: bool = False   # DDP option, for model variants with unused parts


PRESETS = {
    # Deformable DETR as in the paper: ResNet-50, 6+6 layers, 300 queries, 4 levels.
    "paper": {},
    "paper_single_scale": {"num_feature_levels": 1},
    "paper_box_refine": {"with_box_refine": True},
    "paper_two_stage": {"with_box_refine": True, "two_stage": True},
    "detr_paper": {"architecture": "detr", "num_feature_levels": 1, "num_queries": 100,
                   "dim_feedforward": 2048, "lr": 1e-4, "lr_backbone": 1e-5,
                   "epochs": 500, "lr_drop": 400, "cls_loss_coef": 1.0,
                   "set_cost_class": 1.0},
    # A small model for the book and for CPUs, trained from scratch on the synthetic
    # data (benchmarks/train_cpu.md): a RegNetX-400MF with batch norm (every stage
    # trains), 2+2 layers of width 128, iterative refinement and two-stage proposals,
    # no dropout, a learning rate 2.5x the paper's for the whole network, and bfloat16
    # mixed precision where the CPU has it natively (float32 elsewhere).
    "cpu": {"backbone": "regnet_x_400mf", "backbone_norm": "batch_norm",
            "d_model": 128, "n_heads": 8, "enc_layers": 2,
            "dec_layers": 2, "dim_feedforward": 256, "dropout": 0.0, "num_queries": 50,
            "with_box_refine": True, "two_stage": True,
            "num_classes": 7, "dataset": "synthetic", "data_path": "data/synthetic",
            "synthetic_train_images": 1500, "synthetic_val_images": 200,
            "train_scales": [224, 256], "max_size": 256, "val_scale": 256,
            "num_workers": 0, "batch_size": 4, "epochs": 11, "lr_drop": 9,
            "lr": 5e-4, "lr_backbone": 5e-4, "eval_every": 4, "amp": True,
            "output_dir": "runs/cpu"},
}


def _parse_value(text):
    """'3' -> 3, 'true' -> True, '[1, 2]' -> [1, 2], 'abc' -> 'abc' (YAML scalars)."""
    return yaml.safe_load(text)


def get_config(preset="cpu", overrides=None):
    """Build a Config from a preset name or a YAML file, then apply overrides.

    Args:
        preset: a key of PRESETS, or a path to a YAML file with a mapping of keys (it may
            name its own base preset under the key ``preset``).
        overrides: None, a dict, or a list of "key=value" strings.
    """
    values = {}
    if preset in PRESETS:
        values.update(PRESETS[preset])
    elif str(preset).endswith((".yaml", ".yml")):
        path = Path(preset)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys, "
                             f"got {type(loaded).__name__}")
        base = loaded.pop("preset", None)
        if base is not None:
            if base not in PRESETS:
                raise ValueError(f"config file {path} names preset {base!r}; "
                                 f"expected one of {sorted(PRESETS)}")
            values.update(PRESETS[base])
        values.update(loaded)
    else:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)} "
                         f"or a .yaml file")
    if isinstance(overrides, (list, tuple)):
        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override must look like key=value, got {item!r}")
            key, text = item.split("=", 1)
            parsed[key.strip()] = _parse_value(text)
        overrides = parsed
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys are {sorted(known)}")
    return Config(**{key: _check_type(key, value) for key, value in values.items()})


def _check_type(key, value):
    """The value in the type of the field's default; a clear error if it does not fit.

    YAML reads '2e-4' as a string (its floats need a dot), so numbers given as strings
    are converted; an int is accepted where a float is expected.
    """
    default = getattr(Config(), key)
    if default is None or value is None:
        return value
    kind = type(default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise TypeError(f"config key {key!r} expects a {kind.__name__} "
                    f"(like {default!r}), got {value!r} ({type(value).__name__})")


def config_to_dict(cfg):
    """A plain dict (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


# --- checkpoints: the keys that define a model, and those a resumed run may change ------
# A checkpoint's weights fit only the model these keys build (ddetr.engine.checkpoint
# refuses overrides of them when it loads a checkpoint for evaluation or a demo).
MODEL_KEYS = ("architecture", "backbone", "backbone_norm", "dilation", "num_feature_levels",
              "d_model", "n_heads", "enc_layers", "dec_layers", "dim_feedforward",
              "enc_n_points", "dec_n_points", "num_queries", "num_classes",
              "with_box_refine", "two_stage", "query_anchors")

# Keys that ``train(cfg, resume=...)`` applies when they differ from the checkpoint's:
# the run's length and budget, evaluation and logging, the machine (workers, device,
# the operator's backend: the same function), where the run folder is now, the
# initial backbone weights (used only before the first epoch), and the optimisation
# settings that the loop reads afresh or that are set on the restored optimizer and
# scheduler (the rates, weight decay, the step of the drop, clipping). Every other
# key (the model, the loss, the data, batch size, seed, precision) would make the
# continued run a different one than its checkpoint records: a resume that changes one
# is refused, naming it. data_path may move to another existing folder.
RESUMABLE_KEYS = ("epochs", "time_limit_min", "eval_every", "iters_per_epoch", "tensorboard",
                  "num_workers", "device", "attention_backend", "find_unused_parameters",
                  "output_dir", "backbone_weights", "lr", "lr_backbone",
                  "lr_linear_proj_mult", "weight_decay", "lr_drop", "clip_max_norm")
