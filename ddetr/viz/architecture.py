"""Architecture diagrams of DETR and Deformable DETR, with the tensor shapes of a config.

    fig = plot_architecture(get_config("paper"), image_size=(800, 1216))

draws the model of ``cfg.architecture`` top to bottom as boxes and arrows; each box
names a stage and the shapes it produces, computed from the config and the image size
(a stride-s map of an H x W image is ceil(H / s) x ceil(W / s), as the backbone's
stride-2 convolutions give). ``architecture_shapes`` returns the same shapes as a dict.
Shapes use the book's letters: N batch, C = d_model, S tokens, Lq queries.
"""
import functools

import matplotlib.pyplot as plt

from ..models.backbone import Backbone


@functools.lru_cache(maxsize=None)
def _backbone_outputs(name, multi, dilation):
    """The channels and strides of the maps ddetr's Backbone puts out, read off one
    built without weights (a fraction of a second, once per backbone)."""
    backbone = Backbone(name, return_interm_layers=multi, dilation=dilation)
    return tuple(backbone.num_channels), tuple(backbone.strides)


def _ceil_div(a, b):
    return -(-a // b)


def architecture_shapes(cfg, image_size=(800, 1216)):
    """The tensor shapes of one forward pass of ``cfg``'s model on an image_size image.

    Returns a dict: "image", "backbone" (list of (N, C_l, H_l, W_l) of C3-C5 or C5),
    "levels" (list of (N, C, H_l, W_l) after input_proj), "S", "tokens" (N, S, C),
    "queries", "logits" (N, Lq, num_classes), "boxes" (N, Lq, 4), and the strides.
    """
    H, W = image_size
    multi = cfg.architecture == "deformable_detr" and cfg.num_feature_levels > 1
    channels, strides = _backbone_outputs(cfg.backbone, multi, cfg.dilation)
    strides = list(strides)
    backbone = [(("N", c, _ceil_div(H, s), _ceil_div(W, s))) for c, s in zip(channels, strides)]
    level_strides = list(strides)
    levels = [("N", cfg.d_model, h, w) for _, _, h, w in backbone]
    while multi and len(levels) < cfg.num_feature_levels:   # extra stride-2 3x3 convs
        _, _, h, w = levels[-1]
        levels.append(("N", cfg.d_model, _ceil_div(h, 2), _ceil_div(w, 2)))
        level_strides.append(level_strides[-1] * 2)
    S = sum(h * w for _, _, h, w in levels)
    return {"image": ("N", 3, H, W), "backbone": backbone, "backbone_strides": strides,
            "levels": levels, "level_strides": level_strides, "S": S,
            "tokens": ("N", S, cfg.d_model), "queries": cfg.num_queries,
            "logits": ("N", cfg.num_queries, cfg.num_classes),
            "boxes": ("N", cfg.num_queries, 4)}


def _fmt(shape):
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _stages(cfg, sh):
    """[(title, lines of shapes, side note or None)] from top to bottom."""
    C, Lq, S = cfg.d_model, cfg.num_queries, sh["S"]
    backbone = [f"C{3 + i + (3 - len(sh['backbone']))}, stride {s}: {_fmt(shape)}"
                for i, (s, shape) in enumerate(zip(sh["backbone_strides"], sh["backbone"]))]
    if cfg.architecture == "detr":
        return [
            ("image", [_fmt(sh["image"])], None),
            (f"backbone ({cfg.backbone})", backbone, None),
            ("input_proj: 1x1 conv", [_fmt(sh["levels"][0])], None),
            ("flatten + sine position code", [f"tokens {_fmt(sh['tokens'])}, S = H/32 x W/32"],
             None),
            (f"encoder x {cfg.enc_layers}: dense self-attention + FFN",
             [f"attention weights (N, {cfg.n_heads}, {S}, {S}): S^2 per head",
              f"memory {_fmt(sh['tokens'])}"], None),
            (f"decoder x {cfg.dec_layers}: self-attn, dense cross-attn + FFN",
             [f"queries: tgt = 0 ({Lq}, {C}) + query_pos ({Lq}, {C})",
              f"cross-attention weights (N, {cfg.n_heads}, {Lq}, {S})",
              f"hs (N, {Lq}, {C}) per layer"],
             "query_embed\n" + f"({Lq}, {C})"),
            ("heads (every decoder layer)",
             [f"class_embed: logits {_fmt(sh['logits'])}",
              f"bbox_embed: boxes {_fmt(sh['boxes'])} (cx, cy, w, h)"], None),
        ]
    L, K_enc, K_dec, M = len(sh["levels"]), cfg.enc_n_points, cfg.dec_n_points, cfg.n_heads
    levels = [f"level {l}, stride {s}: {_fmt(shape)}"
              for l, (s, shape) in enumerate(zip(sh["level_strides"], sh["levels"]))]
    if cfg.two_stage:
        queries = f"top {Lq} of the\nencoder's proposals\n(N, {S}, 4):\nclass-agnostic,\nno NMS"
        query_lines = [f"reference boxes (N, {Lq}, 4)"]
    else:
        queries = f"query_embed\n({Lq}, {2 * C})"
        query_lines = [f"query_pos + tgt (N, {Lq}, {C}) each",
                       f"reference points (N, {Lq}, 2)"]
    refine = ["each layer refines the reference box"] if cfg.with_box_refine else []
    return [
        ("image", [_fmt(sh["image"])], None),
        (f"backbone ({cfg.backbone})", backbone, None),
        ("input_proj: 1x1 conv + GroupNorm (3x3 stride-2 conv for extra levels)", levels, None),
        ("flatten levels + sine position code + level embedding",
         [f"tokens {_fmt(sh['tokens'])}, S = {S}", f"spatial_shapes ({L}, 2), "
          f"level_start_index ({L},)"], None),
        (f"encoder x {cfg.enc_layers}: MSDeformAttn self-attention + FFN",
         [f"reference points (N, {S}, {L}, 2)",
          f"sampling locations (N, {S}, {M}, {L}, {K_enc}, 2)",
          f"memory {_fmt(sh['tokens'])}"], None),
        (f"decoder x {cfg.dec_layers}: self-attn, MSDeformAttn cross-attn + FFN",
         query_lines + [f"sampling locations (N, {Lq}, {M}, {L}, {K_dec}, 2)",
                        f"hs (N, {Lq}, {C}) per layer"] + refine, queries),
        ("heads (every decoder layer)",
         [f"class_embed: logits {_fmt(sh['logits'])}",
          f"bbox_embed: boxes {_fmt(sh['boxes'])}, relative to the reference"], None),
    ]


def plot_architecture(cfg, image_size=(800, 1216), ax=None):
    """Draw cfg's model (DETR or Deformable DETR) as boxes and arrows with tensor shapes.

    Args:
        cfg: a ddetr.config.Config (architecture, backbone, d_model, levels, queries...).
        image_size: (H, W) of the input image, in pixels.
        ax: matplotlib axes to draw on; None makes a new figure.

    Returns:
        the matplotlib Figure.
    """
    sh = architecture_shapes(cfg, image_size)
    stages = _stages(cfg, sh)
    heights = [1.0 + 0.42 * len(lines) for _, lines, _ in stages]
    gap = 0.55
    total = sum(heights) + gap * (len(stages) - 1)
    if ax is None:
        fig, ax = plt.subplots(figsize=(8.5, 0.55 * total + 0.6))
    else:
        fig = ax.figure
    ax.set_xlim(0, 10)
    ax.set_ylim(-total, 0.3)
    ax.axis("off")
    name = "DETR" if cfg.architecture == "detr" else "Deformable DETR"
    ax.set_title(f"{name}, {image_size[0]} x {image_size[1]} image", fontsize=11)
    y = 0.0
    for i, ((title, lines, side), h) in enumerate(zip(stages, heights)):
        centre = y - h / 2
        ax.text(4.0, centre, title + "\n" + "\n".join(lines), ha="center", va="center",
                fontsize=8, family="monospace", linespacing=1.35,
                bbox=dict(boxstyle="round,pad=0.4", fc="#eef3fb" if i % 2 else "#f6f6f6",
                          ec="#456"))
        if side is not None:
            ax.text(8.6, centre, side, ha="center", va="center", fontsize=8,
                    family="monospace", bbox=dict(boxstyle="round,pad=0.4", fc="#fdf1dc",
                                                  ec="#a60"))
            ax.annotate("", xy=(7.2, centre), xytext=(7.75, centre),
                        arrowprops=dict(arrowstyle="->", color="#a60"))
        if i + 1 < len(stages):
            ax.annotate("", xy=(4.0, y - h - gap + 0.05), xytext=(4.0, y - h + 0.02),
                        arrowprops=dict(arrowstyle="->", color="#456"))
        y -= h + gap
    return fig
