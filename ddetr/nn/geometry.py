"""Coordinates in Deformable DETR: pixel centres, valid parts of padded maps, boxes.

Points are (x, y) in [0, 1] with pixel centres at (j + 0.5) / W, the convention of
``grid_sample(align_corners=False)`` and of the whole library. A batch pads its images
to a common size; a map's *valid* part is the image, and ``valid_ratio`` says which
fraction of the padded map it covers. The model predicts in [0, 1] of the valid image;
the sampling operator reads [0, 1] of the padded map: ``to_padded_levels`` converts.

Boxes are (cx, cy, w, h) in [0, 1]; heads predict them in inverse-sigmoid (logit)
space as offsets from a reference: ``decode_boxes``.

The level table of a flattened multi-scale sequence (``level_start_index``) is
``ddetr.ops.level_start_index_of``, next to the operator that reads it.
"""
import torch


def pixel_centres(H, W, size=None, dtype=torch.float32, device=None):
    """The centre of every pixel of an H x W map, row-major, as (x, y).

    Args:
        H, W: the map's size in pixels.
        size: what the centres (j + 0.5, i + 0.5) are divided by, as (width, height):
            None for (W, H), i.e. [0, 1] of the map; or a tensor (..., 2) broadcast
            against (H*W, 2), e.g. (N, 1, 2) per image of a batch.

    Returns:
        (H*W, 2), or (..., H*W, 2) with a batched size.
    """
    ys = torch.arange(H, dtype=dtype, device=device) + 0.5
    xs = torch.arange(W, dtype=dtype, device=device) + 0.5
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack((x, y), -1).view(H * W, 2)
    if size is None:
        size = size_tensor(W, H, dtype, device)
    return centres / size


def size_tensor(W, H, dtype=torch.float32, device=None):
    """(2,) tensor (W, H) of a map's size. Built from scalar tensors, so that a graph
    traced with dynamic image sizes (torch.export) keeps the sizes symbolic."""
    return torch.stack([torch.scalar_tensor(W, dtype=dtype, device=device),
                        torch.scalar_tensor(H, dtype=dtype, device=device)])


def valid_size(mask):
    """mask (N, H, W) bool (True = padding) -> (N, 2) int64 (valid W, valid H).

    Images sit at the top left of the padded map, so the first column and the first
    row count the valid pixels."""
    return torch.stack([(~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)], -1)


def valid_ratio(mask):
    """mask (N, H, W) bool (True = padding) -> (N, 2) float32 (valid W / W, valid H / H)."""
    _, H, W = mask.shape
    size = valid_size(mask).float()
    return torch.stack([size[:, 0] / W, size[:, 1] / H], -1)  # no (W, H) tensor to copy


def to_padded_levels(points, valid_ratios):
    """Points (N, Lq, 2) or boxes (N, Lq, 4) in [0, 1] of the valid image -> (N, Lq, L, 2|4)
    in [0, 1] of each level's padded map (valid_ratios (N, L, 2))."""
    if points.shape[-1] == 4:
        valid_ratios = torch.cat([valid_ratios, valid_ratios], -1)  # (N, L, 4)
    return points[:, :, None] * valid_ratios[:, None]


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)), clamped so that 0 and 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def decode_boxes(delta, reference):
    """A box head's output relative to a reference -> boxes in [0, 1].

    Args:
        delta: (..., 4) offsets in inverse-sigmoid space.
        reference: (..., 4) boxes (cx, cy, w, h) or (..., 2) points (cx, cy) in [0, 1].

    Returns:
        (..., 4) sigmoid(delta + inverse_sigmoid(reference)); a point reference moves
        only the centre, the size is sigmoid(delta_wh).
    """
    reference = inverse_sigmoid(reference)
    if reference.shape[-1] == 4:
        return (delta + reference).sigmoid()
    return torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1).sigmoid()
