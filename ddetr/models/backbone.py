"""The CNN backbone: a torchvision ResNet that returns C3, C4, C5 with their masks.

    images (N, 3, H, W) --ResNet--> C3 (N, C3, H/8, W/8)     layer2
                                    C4 (N, C4, H/16, W/16)   layer3
                                    C5 (N, C5, H/32, W/32)   layer4

(C3/C4/C5 = 512/1024/2048 channels for ResNet-50, 128/256/512 for ResNet-18/34.) A
single-scale model asks only for C5.

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
starts as the identity.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from ..nn.position_encoding import build_position_encoding

RESNETS = ("resnet18", "resnet34", "resnet50")
NORMS = ("frozen_bn", "group_norm")


def group_norm(channels):
    """GroupNorm with 32 groups: the norm layer of a ResNet trained from scratch."""
    return nn.GroupNorm(32, channels)


def resize_mask(mask, size):
    """mask (N, H, W) bool -> (N, h, w) bool by nearest-neighbour resizing."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class Backbone(nn.Module):
    """A ResNet cut after layer2/3/4, with frozen BN, stem and layer1.

    Args:
        name: "resnet18", "resnet34" or "resnet50".
        train_backbone: False freezes every parameter (e.g. when lr_backbone is 0).
        return_interm_layers: True returns C3, C4, C5; False returns C5 only.
        dilation: replace the stride of layer4 by dilation (the DC5 variant).
        weights: None, or a path to a torchvision ResNet state dict.
        norm: "frozen_bn" (the paper's, for pretrained weights: stem and layer1 frozen)
            or "group_norm" (training from scratch: every stage trains).

    Attributes: ``strides`` (8, 16, 32 or just 32) and ``num_channels`` of the outputs.
    """

    def __init__(self, name="resnet50", train_backbone=True, return_interm_layers=True,
                 dilation=False, weights=None, norm="frozen_bn"):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"backbone must be one of {RESNETS}, got {name!r}")
        if norm not in NORMS:
            raise ValueError(f"backbone_norm must be one of {NORMS}, got {norm!r}")
        from_scratch = norm == "group_norm"
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation],
            norm_layer=group_norm if from_scratch else FrozenBatchNorm2d,
            zero_init_residual=from_scratch)
        if weights is not None:
            load_resnet_weights(resnet, weights)
        trained_stages = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4") \
            if from_scratch else ("layer2", "layer3", "layer4")
        for param_name, param in resnet.named_parameters():
            param.requires_grad_(train_backbone and param_name.startswith(trained_stages))
        # the number of channels each stage puts out (the last conv of its last block)
        stage_channels = [_out_channels(getattr(resnet, f"layer{i}")) for i in (2, 3, 4)]
        if return_interm_layers:
            return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            self.strides = [8, 16, 32]
            self.num_channels = stage_channels
        else:
            return_layers = {"layer4": "0"}
            self.strides = [32]
            self.num_channels = stage_channels[-1:]
        if dilation:
            self.strides[-1] //= 2
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)

    def forward(self, images, mask):
        """images (N, 3, H, W), mask (N, H, W) bool -> list of (feature (N, C_l, H_l, W_l),
        mask (N, H_l, W_l) bool), from the finest to the coarsest map."""
        out = []
        for feature in self.body(images).values():
            out.append((feature, resize_mask(mask, feature.shape[-2:])))
        return out


def _out_channels(stage):
    """Output channels of a ResNet stage (a Sequential of BasicBlock/Bottleneck)."""
    block = stage[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.weight.shape[0]


def load_resnet_weights(resnet, path):
    """Load a torchvision ResNet state dict from disk (the ``fc`` classifier may be absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone_weights: no file at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise RuntimeError(f"backbone_weights {path} does not fit a torchvision ResNet: "
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
