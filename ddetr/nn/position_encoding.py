"""Sine position encoding of a (padded) feature map, as in DETR and Deformable DETR.

Attention itself knows nothing about where a pixel is, so each pixel's feature gets a
position code added to its query (and, in DETR, its key). The code of pixel (y, x) is
a bank of sines and cosines of its coordinates at geometrically spaced frequencies:
C/2 channels for y followed by C/2 channels for x.

Padding: a batch holds images of different sizes padded to a common one, with a mask
(True = padding). The coordinates count only valid pixels (a cumulative sum of the
not-padding mask) and are normalised by the image's own valid height and width, so an
image gets the same codes whether or not it is padded, and the code tells a pixel where
it is *in its image*, not in the padded canvas. Pixel centres sit at (i + 0.5) / H,
the convention of the official Deformable DETR (DETR itself uses (i + 1) / H).
"""
import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Args:
        num_pos_feats: channels per axis (C / 2 for a model of width C).
        temperature: the largest wavelength is 2 pi * temperature (in units of scale).
        normalize: map coordinates to [0, scale] of the valid image (always on here).
        scale: 2 pi, so that one image spans one turn of the fastest sine.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask):
        """mask (N, H, W) bool, True = padding -> pos (N, 2 * num_pos_feats, H, W) float32."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be (N, H, W) bool, got {tuple(mask.shape)} "
                             f"{mask.dtype}")
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # 1..H_valid down each column
        x_embed = not_mask.cumsum(2, dtype=torch.float32)  # 1..W_valid along each row
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t  # (N, H, W, F)
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave: sin on even channels, cos on odd channels
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def build_position_encoding(cfg):
    """The sine encoding with d_model channels in all (d_model / 2 per axis)."""
    return PositionEmbeddingSine(cfg.d_model // 2, normalize=True)
