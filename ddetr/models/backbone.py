"""The CNN backbone: a torchvision ResNet (or RegNet) that returns C3, C4, C5 with masks.

    images (N, 3, H, W) --ResNet--> C3 (N, C3, H/8, W/8)     layer2
                                    C4 (N, C4, H/16, W/16)   layer3
                                    C5 (N, C5, H/32, W/32)   layer4

(C3/C4/C5 = 512/1024/2048 channels for ResNet-50, 128/256/512 for ResNet-18/34,
64/160/400 for RegNetX-400MF.) A single-scale model asks only for C5.

As in the paper (and DETR), batch norm is frozen: ``FrozenBatchNorm2d`` holds the
statistics and affine parameters as buffers, because detection batches (2 images per
GPU) are far too small to estimate them. The stem (conv1) and the first stage (layer1)
are frozen too; layer2-4 train with a smaller learning rate (the engine's business).

Each feature map comes with a padding mask, the image mask (N, H, W) resized to the map
with nearest neighbour, and ``Joiner`` adds the sine position code of every map. Module
names (``backbone.0.body.layer2...``, ``backbone.1`` for the position code) follow the
official release so its checkpoints load.

No weights are downloaded: ``cfg.backbone_weights`` may name a torchvision ResNet
state dict on disk (e.g. ``resnet50-0676ba61.pth``); otherwise the ResNet starts random.

Frozen batch norm only makes sense for pretrained weights: with random weights it is a
fixed identity, and a frozen random stem is a fixed random projection. A ResNet trained
from scratch therefore uses ``norm="group_norm"`` (32 groups, independent of the batch
size, so it also behaves the same on one process and on many), with every stage
trainable and the last norm of each residual block starting at zero, so that each block
starts as the identity. ``norm="batch_norm"`` trains from scratch with ordinary batch
norm instead (statistics of each process's batch: images x pixels of every map, plenty
even for 4 images), which is faster than group norm on a CPU.

The small CPU preset uses torchvision's RegNetX-400MF (Radosavovic et al., 2020), the
same stages as a ResNet (stem, four stages of strides 4-32) at about a fifth of
ResNet-18's FLOPs: a from-scratch backbone that trains twice as fast on two cores.
"""
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from ..nn.position_encoding import build_position_encoding

RESNETS = ("resnet18", "resnet34", "resnet50")
REGNETS = ("regnet_x_400mf", "regnet_x_800mf", "regnet_y_400mf")
BACKBONES = RESNETS + REGNETS
NORMS = ("frozen_bn", "group_norm", "batch_norm")


def group_norm(channels):
    """GroupNorm with 32 groups (fewer when 32 does not divide the channels): the norm
    layer of a backbone trained from scratch."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def resize_mask(mask, size):
    """mask (N, H, W) bool -> (N, h, w) bool by nearest-neighbour resizing."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class Backbone(nn.Module):
    """A ResNet cut after layer2/3/4 (a RegNet after block2/3/4), frozen BN, stem, stage 1.

    Args:
        name: one of BACKBONES: "resnet18", "resnet34", "resnet50", or a torchvision
            RegNet ("regnet_x_400mf", "regnet_x_800mf", "regnet_y_400mf").
        train_backbone: False freezes every parameter (e.g. when lr_backbone is 0).
        return_interm_layers: True returns C3, C4, C5; False returns C5 only.
        dilation: replace the stride of the last stage by dilation (the DC5 variant;
            ResNets only).
        weights: None, or a path to a torchvision state dict of the same network.
        norm: "frozen_bn" (the paper's, for pretrained weights: stem and stage 1
            frozen), "group_norm" or "batch_norm" (training from scratch: every stage
            trains).

    Attributes: ``strides`` (8, 16, 32 or just 32) and ``num_channels`` of the outputs.
    """

    def __init__(self, name="resnet50", train_backbone=True, return_interm_layers=True,
                 dilation=False, weights=None, norm="frozen_bn"):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
        if norm not in NORMS:
            raise ValueError(f"backbone_norm must be one of {NORMS}, got {norm!r}")
        if dilation and name not in RESNETS:
            raise ValueError(f"dilation=True needs a ResNet backbone {RESNETS}, got {name!r}")
        norm_layer = {"frozen_bn": FrozenBatchNorm2d, "group_norm": group_norm,
                      "batch_norm": nn.BatchNorm2d}[norm]
        from_scratch = norm != "frozen_bn"
        if name in RESNETS:
            net = getattr(torchvision.models, name)(
                weights=None, replace_stride_with_dilation=[False, False, dilation],
                norm_layer=norm_layer, zero_init_residual=norm == "group_norm")
            stages = ["layer1", "layer2", "layer3", "layer4"]
            frozen = ("conv1", "bn1", "layer1")
        else:
            net = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
            stages = ["block1", "block2", "block3", "block4"]
            frozen = ("stem", "trunk_output.block1")
        if weights is not None:
            load_resnet_weights(net, weights)
        for param_name, param in net.named_parameters():
            trains = from_scratch or not param_name.startswith(frozen)
            param.requires_grad_(train_backbone and trains)
        if name in REGNETS:     # the same flat layout as a ResNet: stem, then the stages
            net = nn.Sequential(OrderedDict(
                [("stem", net.stem)] + [(s, getattr(net.trunk_output, s)) for s in stages]))
        # the number of channels each stage puts out (the last conv of its last block)
        stage_channels = [_out_channels(getattr(net, s)) for s in stages[1:]]
        if return_interm_layers:
            return_layers = {s: str(i) for i, s in enumerate(stages[1:])}
            self.strides = [8, 16, 32]
            self.num_channels = stage_channels
        else:
            return_layers = {stages[-1]: "0"}
            self.strides = [32]
            self.num_channels = stage_channels[-1:]
        if dilation:
            self.strides[-1] //= 2
        self.body = IntermediateLayerGetter(net, return_layers=return_layers)

    def forward(self, images, mask):
        """images (N, 3, H, W), mask (N, H, W) bool -> list of (feature (N, C_l, H_l, W_l),
        mask (N, H_l, W_l) bool), from the finest to the coarsest map."""
        out = []
        for feature in self.body(images).values():
            out.append((feature, resize_mask(mask, feature.shape[-2:])))
        return out


def _out_channels(stage):
    """Output channels of a stage (a Sequential of residual blocks): those of the last
    convolution of its last block (which has no downsampling branch)."""
    convs = [m for m in stage[-1].modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def load_resnet_weights(resnet, path):
    """Load a torchvision ResNet/RegNet state dict from disk (``fc`` may be absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights: no file at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise RuntimeError(f"backbone_weights {path} does not fit the torchvision network: "
                           f"missing keys {missing}, unexpected keys {unexpected}")


class Joiner(nn.Sequential):
    """backbone.0 = Backbone, backbone.1 = position encoding (no parameters).

    forward(images, mask) -> (features, pos): features as ``Backbone.forward``, pos a list
    of (N, d_model, H_l, W_l) sine codes, one per map.
    """

    def __init__(self, backbone, position_embedding):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images, mask):
        features = self[0](images, mask)
        pos = [self[1](m).to(f.dtype) for f, m in features]
        return features, pos


def build_backbone(cfg, return_interm_layers=None):
    """The Joiner for cfg. C3-C5 when cfg.num_feature_levels > 1, else C5 only."""
    if return_interm_layers is None:
        return_interm_layers = cfg.num_feature_levels > 1
    backbone = Backbone(cfg.backbone, train_backbone=cfg.lr_backbone > 0,
                        return_interm_layers=return_interm_layers, dilation=cfg.dilation,
                        weights=cfg.backbone_weights, norm=cfg.backbone_norm)
    return Joiner(backbone, build_position_encoding(cfg))
