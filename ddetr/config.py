"""One flat configuration for model, loss, data and training, its presets and its checks.

Defaults, one story: the fields of ``Config`` hold the paper's Deformable DETR
(ResNet-50, 6+6 layers, 300 queries, 4 levels, COCO's 91 classes), so ``Config()``,
``get_config()`` and ``get_config("paper")`` are the same config. A preset is a name for
a set of changes to those values; the book and the command line use the small "cpu"
preset (``python -m ddetr train`` trains it unless ``--config`` names another).

A run is a preset plus overrides, given as a dict, as ``key=value`` strings (the CLI),
or as a YAML file of keys. A key that does not exist is an error that names it, so a
typo never silently trains the wrong model.

    cfg = get_config("cpu", {"epochs": 2})
    cfg = get_config("paper", ["two_stage=true", "with_box_refine=true"])

Every Config is checked when it is made, before any data is generated or any step
trained: the type and range of every key, the keys that must agree (d_model and
n_heads, DAB anchors and refinement, the switches the dense DETR does not have), and
the names of architectures, backbones, backends and devices. A mistake is a ValueError
or TypeError that names the key, what was expected and what was given. Whether this
machine has the device is checked when a run starts (``engine.train.resolve_device``).
"""
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import DATASETS
from .files import existing_file
from .models import ARCHITECTURES
from .models.backbone import BACKBONES, NORMS, RESNETS
from .models.deformable_detr import INPUT_PROJ_GROUPS
from .nn.deformable_transformer import ATTENTIONS
from .ops.ms_deform_attn import BACKENDS


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
    # --- training-only techniques from after the paper (inference stays Deformable DETR)
    dn_detr: bool = False                  # DN-DETR's denoising queries (ddetr.models.
                                           # denoising); needs two_stage or dab anchors
    dn_groups: int = 5                     # noised copies of the objects per image
    dn_label_noise: float = 0.2            # probability of a flipped label
    dn_box_noise: float = 0.4              # centre shift / size scale, in box sizes
    dino_look_forward_twice: bool = False  # DINO's Sec. 3.5: a layer's box loss also
                                           # trains the layer before (needs refinement)
    h_detr: bool = False                   # H-DETR's hybrid matching (ddetr.models.
                                           # hybrid_matching); needs two_stage
    h_detr_queries: int = 150              # one-to-many queries (more proposals)
    h_detr_k: int = 6                      # each object repeated k times for them
    rt_detr_vfl: bool = False              # RT-DETR's IoU-aware classification: the
                                           # varifocal loss towards the matched box's
                                           # IoU (ddetr.models.iou_aware)
    attention: str = "deformable"          # "dense": DETR's attention in the encoder and
                                           # the decoder's cross-attention, all else kept
                                           # (the baseline that differs in attention only)
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
    lr_warmup_iters: int = 0               # the rates rise linearly over this many first
                                           # iterations (Goyal et al. 2017); 0: none
    clip_max_norm: float = 0.1
    amp: bool = False                      # mixed precision: CUDA, or CPUs with native bf16
    seed: int = 42
    device: str = "auto"                   # auto | cpu | cuda
    output_dir: str = "runs/default"
    eval_every: int = 1                    # epochs between COCO evaluations
    iters_per_epoch: int = 0               # 0 = whole epoch; >0 caps it (quick runs)
    time_limit_min: float = 0.0            # >0: a time budget; the lr drop and the end
                                           # follow progress through it (engine.schedule)
    threads: int = 0                       # CPU threads; 0: tuned while training, under
                                           # load too (engine.threads); N: exactly N
    tensorboard: bool = False              # also log to output_dir (needs tensorboard)
    find_unused_parameters: bool = False   # DDP option, for model variants with unused parts

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_type(f, getattr(self, f.name)))
        check_config(self)


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
    # trains), 2 encoder and 4 decoder layers of width 128, iterative refinement and
    # two-stage proposals, no dropout, one rate for the whole network, bfloat16 mixed
    # precision where the CPU has it natively (float32 elsewhere), DN-DETR's denoising
    # queries and RT-DETR's IoU-aware classification in training (turning two_stage
    # off needs dn_detr=false too), and batches of 4 at 5x the paper's rate: the rate
    # that served batches of 2 (3.5x) times the square root of 2, the scaling rule for
    # Adam-like optimizers (Malladi et al., NeurIPS 2022). benchmarks/train_cpu.md,
    # "recipe runs" and "budget runs": at 7,500 images that rate did better on both
    # seeds than twice the rate (the linear rule), the IoU-aware loss brought both
    # seeds above AP 0.5, and batches of 4 train more images a second than batches of 2.
    "cpu": {"backbone": "regnet_x_400mf", "backbone_norm": "batch_norm",
            "d_model": 128, "n_heads": 8, "enc_layers": 2,
            "dec_layers": 4, "dim_feedforward": 256, "dropout": 0.0, "num_queries": 50,
            "with_box_refine": True, "two_stage": True,
            "num_classes": 7, "dataset": "synthetic", "data_path": "data/synthetic",
            "synthetic_train_images": 1500, "synthetic_val_images": 200,
            "train_scales": [224, 256], "max_size": 256, "val_scale": 256,
            "num_workers": 0, "batch_size": 4, "epochs": 11, "lr_drop": 9,
            "lr": 1e-3, "lr_backbone": 1e-3, "eval_every": 4, "amp": True,
            "dn_detr": True, "rt_detr_vfl": True,
            "output_dir": "runs/cpu"},
}


# --- reading presets, YAML files and overrides -------------------------------------
def _parse_value(text, item):
    """'3' -> 3, 'true' -> True, '[1, 2]' -> [1, 2], 'abc' -> 'abc' (YAML scalars)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: {text!r} is not a YAML value "
                         f"({getattr(e, 'problem', None) or e})") from None


def parse_overrides(overrides):
    """None, a dict, or a list of "key=value" strings (values read as YAML) -> a dict."""
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):
        raise TypeError(f"overrides must be a dict or a list of 'key=value' strings, "
                        f"got {type(overrides).__name__} {overrides!r}")
    parsed = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"override must look like key=value, got {item!r}")
        key, text = item.split("=", 1)
        parsed[key.strip()] = _parse_value(text, item)
    return parsed


def _read_yaml(path):
    """The mapping of keys in a YAML config file; errors name the file and the line."""
    existing_file(path, "config", "a YAML file of key: value lines (e.g. my.yaml) or a "
                  "preset name")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"config file {path}{where}: {getattr(e, 'problem', None) or e} "
                         f"(expected a YAML mapping of key: value lines)") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not a text file ({e.reason})") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys, "
                         f"got a {type(loaded).__name__}")
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise ValueError(f"config file {path}: keys must be names, got {bad}")
    return loaded


def get_config(preset="paper", overrides=None):
    """Build a checked Config from a preset name or a YAML file, then apply overrides.

    Args:
        preset: a key of PRESETS, or a path to a YAML file with a mapping of keys (it may
            name its own base preset under the key ``preset``).
        overrides: None, a dict, or a list of "key=value" strings.
    """
    values, source = {}, f"preset {preset!r}"
    if isinstance(preset, str) and preset in PRESETS:
        values.update(PRESETS[preset])
    elif str(preset).endswith((".yaml", ".yml")) or Path(str(preset)).is_dir():
        path, source = Path(preset), f"config file {preset}"
        loaded = _read_yaml(path)
        base = loaded.pop("preset", None)
        if base is not None:
            if base not in PRESETS:
                raise ValueError(f"config file {path} names preset {base!r}; "
                                 f"expected one of {sorted(PRESETS)}")
            values.update(PRESETS[base])
        _check_known(loaded, source)
        values.update(loaded)
    else:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)} "
                         f"or a .yaml file")
    overrides = parse_overrides(overrides)
    _check_known(overrides, "overrides")
    values.update(overrides)
    return Config(**values)


def _check_known(values, source):
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {source}; known keys are "
                         f"{sorted(known)}")


def _check_type(f, value):
    """The value of field f in the type of its default; a clear error if it does not fit.

    YAML reads '2e-4' as a string (its floats need a dot), so numbers given as strings
    are converted; an int is accepted where a float is expected.
    """
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if default is None:                               # optional paths
        if value is None or isinstance(value, str):
            return value
        raise TypeError(f"config key {f.name!r} expects a path (str) or null, "
                        f"got {value!r} ({type(value).__name__})")
    kind = type(default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        if kind is float and not math.isfinite(value):
            raise ValueError(f"config key {f.name!r} expects a finite number, got {value!r}")
        return value
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            value = float(value)
        except ValueError:
            pass
        else:
            return _check_type(f, value)
    if kind is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise TypeError(f"config key {f.name!r} expects {article} {kind.__name__} "
                    f"(like {default!r}), got {value!r} ({type(value).__name__})")


# --- checks: ranges, choices, keys that must agree -------------------------------------
MAX_FEATURE_LEVELS = 4   # the paper's C3, C4, C5 and one extra stride-2 level
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")

# key: (what is expected, test of the value)
RANGES = {
    "num_feature_levels": (f"1 (C5 only) or 3..{MAX_FEATURE_LEVELS} (C3-C5, then extra "
                           f"stride-2 levels)", lambda v: v == 1 or 3 <= v <= MAX_FEATURE_LEVELS),
    "dropout": ("a value in [0, 1)", lambda v: 0 <= v < 1),
    "focal_alpha": ("a value in [0, 1]", lambda v: 0 <= v <= 1),
    "dn_label_noise": ("a value in [0, 1]", lambda v: 0 <= v <= 1),
    "dn_box_noise": ("a value in [0, 1]", lambda v: 0 <= v <= 1),
    "lr": ("> 0", lambda v: v > 0),
    "synthetic_image_size": (">= 32 (pixels)", lambda v: v >= 32),
    "train_scales": ("a non-empty list of sizes >= 1 (pixels)",
                     lambda v: len(v) > 0 and all(type(s) is int and s >= 1 for s in v)),
    "device": ("'auto', 'cpu', 'cuda' or 'cuda:N'", lambda v: DEVICE.fullmatch(v)),
    "data_path": ("a folder (a non-empty path)", lambda v: v.strip() != ""),
    "output_dir": ("a folder (a non-empty path)", lambda v: v.strip() != ""),
}
RANGES.update({k: (">= 1", lambda v: v >= 1) for k in (
    "d_model", "n_heads", "enc_layers", "dec_layers", "dim_feedforward", "enc_n_points",
    "dec_n_points", "num_queries", "num_classes", "max_size", "val_scale", "batch_size",
    "epochs", "lr_drop", "synthetic_train_images", "synthetic_val_images", "dn_groups",
    "h_detr_queries", "h_detr_k")})
RANGES.update({k: (">= 0", lambda v: v >= 0) for k in (
    "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_max_norm", "num_workers",
    "lr_warmup_iters",
    "threads", "eval_every", "iters_per_epoch", "time_limit_min", "synthetic_seed", "set_cost_class",
    "set_cost_bbox", "set_cost_giou", "cls_loss_coef", "bbox_loss_coef",
    "giou_loss_coef")})
RANGES["eval_every"] = (">= 0 (epochs between evaluations; 0: only at the end)",
                        lambda v: v >= 0)


def _choices():
    """The names the model code accepts, from the modules that define them."""
    return {"architecture": ARCHITECTURES, "backbone": BACKBONES, "backbone_norm": NORMS,
            "attention_backend": BACKENDS, "dataset": DATASETS,
            "query_anchors": ("none", "dab"), "attention": ATTENTIONS}


def check_config(cfg):
    """Raise a ValueError naming the first key of cfg that is out of range, not one of
    its choices, or at odds with another key. (Types are checked by Config itself.)"""
    for key, choices in _choices().items():
        if getattr(cfg, key) not in choices:
            raise ValueError(f"config key {key!r} expects one of {list(choices)}, "
                             f"got {getattr(cfg, key)!r}")
    for key, (expected, test) in RANGES.items():
        value = getattr(cfg, key)
        if not test(value):
            raise ValueError(f"config key {key!r} expects {expected}, got {value!r}")
    _check_combinations(cfg)


def _check_combinations(cfg):
    def fail(keys, text):
        raise ValueError(f"config key{'s' if len(keys) > 1 else ''} "
                         f"{', '.join(map(repr, keys))}: {text}")

    if cfg.d_model % cfg.n_heads:
        fail(["d_model", "n_heads"], f"d_model={cfg.d_model} must be divisible by "
                                     f"n_heads={cfg.n_heads}")
    if cfg.d_model % 2:
        fail(["d_model"], f"d_model={cfg.d_model} must be even (the sine position code "
                          f"gives d_model / 2 channels to each axis)")
    if cfg.architecture == "deformable_detr" and cfg.d_model % INPUT_PROJ_GROUPS:
        fail(["d_model"], f"d_model={cfg.d_model} must be divisible by "
                          f"{INPUT_PROJ_GROUPS}, the groups of the input projections' "
                          f"GroupNorm")
    if cfg.query_anchors == "dab" and not cfg.with_box_refine:
        fail(["query_anchors", "with_box_refine"], "query_anchors='dab' refines its anchor "
             "boxes layer by layer: it needs with_box_refine=true")
    if cfg.query_anchors == "dab" and cfg.two_stage:
        fail(["query_anchors", "two_stage"], "query_anchors='dab' and two_stage=true both "
             "make the decoder's queries; choose one")
    if cfg.architecture == "detr" and cfg.attention != "deformable":
        fail(["architecture", "attention"], "attention='dense' makes Deformable DETR's "
             "model dense (architecture='deformable_detr'); architecture='detr' is DETR's "
             "own model, dense already: leave attention='deformable'")
    if cfg.architecture == "detr":
        unused = {"num_feature_levels": cfg.num_feature_levels != 1,
                  "with_box_refine": cfg.with_box_refine, "two_stage": cfg.two_stage,
                  "query_anchors": cfg.query_anchors != "none"}
        unused = [k for k, on in unused.items() if on]
        if unused:
            fail(["architecture", *unused], "the dense DETR (architecture='detr') has no "
                 "multi-scale levels, refinement, two-stage proposals or anchor queries: "
                 "set num_feature_levels=1, with_box_refine=false, two_stage=false, "
                 "query_anchors=none")
    if cfg.dilation and cfg.backbone not in RESNETS:
        fail(["dilation", "backbone"], f"dilation=true needs a ResNet backbone "
                                       f"{list(RESNETS)}, got {cfg.backbone!r}")
    if cfg.set_cost_class == cfg.set_cost_bbox == cfg.set_cost_giou == 0:
        fail(["set_cost_class", "set_cost_bbox", "set_cost_giou"],
             "all matching costs are 0: the matcher needs at least one > 0")
    _check_training_switches(cfg, fail)


def _check_training_switches(cfg, fail):
    """The training-only techniques after the paper need the parts they work on."""
    deformable = cfg.architecture == "deformable_detr"
    if cfg.h_detr and not (cfg.two_stage and deformable):
        fail(["h_detr", "two_stage"], "h_detr=true takes its one-to-many queries from "
             "more encoder proposals: it needs Deformable DETR with two_stage=true")
    if cfg.dino_look_forward_twice and not (cfg.with_box_refine and deformable):
        fail(["dino_look_forward_twice", "with_box_refine"], "look forward twice passes "
             "gradients through the refined boxes: it needs Deformable DETR with "
             "with_box_refine=true")
    if cfg.dn_detr and not (deformable and (cfg.two_stage or cfg.query_anchors == "dab")):
        fail(["dn_detr", "two_stage", "query_anchors"], "dn_detr=true gives the decoder "
             "noised ground-truth boxes as reference boxes: it needs Deformable DETR with "
             "4-d reference boxes, two_stage=true or query_anchors=dab (or dn_detr=false)")


def config_to_dict(cfg):
    """A plain dict (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


# --- checkpoints: the keys that define a model, and those a resumed run may change ------
# A checkpoint's weights fit only the model these keys build (ddetr.engine.checkpoint
# refuses overrides of them when it loads a checkpoint for evaluation or a demo).
MODEL_KEYS = ("architecture", "backbone", "backbone_norm", "dilation", "num_feature_levels",
              "d_model", "n_heads", "enc_layers", "dec_layers", "dim_feedforward",
              "enc_n_points", "dec_n_points", "num_queries", "num_classes",
              "with_box_refine", "two_stage", "query_anchors", "attention", "dn_detr")
# (the other training-only switches, dino_look_forward_twice, h_detr and rt_detr_vfl,
# add no weights)

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
                  "num_workers", "threads", "device", "attention_backend", "find_unused_parameters",
                  "output_dir", "backbone_weights", "lr", "lr_backbone",
                  "lr_linear_proj_mult", "weight_decay", "lr_drop", "lr_warmup_iters",
                  "clip_max_norm")
