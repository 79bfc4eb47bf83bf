"""The geometry helpers (ddetr.nn.geometry, sine_embed) against the formulas they
replaced, which were written out separately in the encoder, the two-stage proposals,
the DAB decoder, the position encoding, the detector, the book's figures and the
complexity sweep. Each comparison is exact (torch.equal): the model's numbers did not
change when the copies became one."""
import math

import pytest
import torch

from ddetr.analysis import pixel_reference_points
from ddetr.nn import DeformableTransformer, PositionEmbeddingSine
from ddetr.nn.geometry import (decode_boxes, inverse_sigmoid, pixel_centres,
                               to_padded_levels, valid_ratio, valid_size)
from ddetr.nn.position_encoding import sine_embed
from ddetr.ops import level_start_index_of

SHAPES = [(1, 1), (3, 7), (13, 10), (50, 67), (100, 133)]


def padded_masks(H, W, valid):
    """(N, H, W) masks of images of sizes valid [(h, w), ...] padded to H x W."""
    masks = torch.ones(len(valid), H, W, dtype=torch.bool)
    for mask, (h, w) in zip(masks, valid):
        mask[:h, :w] = False
    return masks


@pytest.mark.parametrize("H, W", SHAPES)
def test_pixel_centres_are_the_arange_formula_of_the_figures(H, W):
    for dtype in (torch.float32, torch.float64):
        ys = (torch.arange(H, dtype=dtype) + 0.5) / H
        xs = (torch.arange(W, dtype=dtype) + 0.5) / W
        old = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(H * W, 2)
        assert torch.equal(pixel_centres(H, W, dtype=dtype), old)
        assert torch.equal(pixel_reference_points(H, W, batch=2, dtype=dtype),
                           old[None].expand(2, -1, -1))


def old_valid_ratio(mask):
    _, H, W = mask.shape
    valid_H = (~mask[:, :, 0]).sum(1)
    valid_W = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)


@pytest.mark.parametrize("H, W", SHAPES[1:])
def test_valid_size_and_ratio(H, W):
    valid = [(H, W), (max(1, H // 3), W), (H, max(1, W - 1)), (max(1, H - 2), 1)]
    masks = padded_masks(H, W, valid)
    assert valid_size(masks).tolist() == [[w, h] for h, w in valid]
    assert torch.equal(valid_ratio(masks), old_valid_ratio(masks))


def test_encoder_reference_points_are_the_official_linspace_formula():
    """The encoder's points: centre / (valid ratio * size), then * valid ratio."""
    shapes = [(50, 67), (25, 34), (13, 17), (7, 9)]
    masks = [padded_masks(H, W, [(H, W), (H * 2 // 3, W // 2 + 1)]) for H, W in shapes]
    valid_ratios = torch.stack([old_valid_ratio(m) for m in masks], 1)  # (N, L, 2)
    old = []
    for lvl, (H, W) in enumerate(shapes):
        ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, H - 0.5, H),
                                      torch.linspace(0.5, W - 0.5, W), indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
        old.append(torch.stack((ref_x, ref_y), -1))
    old = torch.cat(old, 1)[:, :, None] * valid_ratios[:, None]
    tr = DeformableTransformer(32, 4, 1, 1, 64, 0.0, len(shapes), 2, 2)
    assert torch.equal(tr.encoder.get_reference_points(shapes, valid_ratios), old)


def test_proposal_centres_are_the_arange_formula_over_the_valid_size():
    H, W = 13, 17
    mask = padded_masks(H, W, [(H, W), (9, 11)])
    valid_H, valid_W = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
    grid_y, grid_x = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                                    torch.arange(W, dtype=torch.float32), indexing="ij")
    grid = torch.stack([grid_x, grid_y], -1)
    size = torch.stack([valid_W, valid_H], -1).view(2, 1, 1, 2).float()
    old = ((grid[None] + 0.5) / size).view(2, H * W, 2)
    assert torch.equal(pixel_centres(H, W, valid_size(mask).float()[:, None]), old)


def test_to_padded_levels_scales_points_and_boxes():
    valid_ratios = torch.rand(2, 3, 2)
    points, boxes = torch.rand(2, 5, 2), torch.rand(2, 5, 4)
    assert torch.equal(to_padded_levels(points, valid_ratios),
                       points[:, :, None] * valid_ratios[:, None])
    ratios4 = torch.cat([valid_ratios, valid_ratios], -1)
    assert torch.equal(to_padded_levels(boxes, valid_ratios),
                       boxes[:, :, None] * ratios4[:, None])


def old_position_embedding(mask, F, temperature=10000, scale=2 * math.pi):
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + 1e-6) * scale
    x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + 1e-6) * scale
    dim_t = torch.arange(F, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / F)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def old_box_sine_embed(boxes, F, temperature=10000):
    """The DAB decoder's and (with proposals.sigmoid()) the two-stage proposals' copy."""
    dim_t = torch.arange(F, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / F)
    pos = boxes[:, :, :, None] * (2 * math.pi) / dim_t
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4)
    return pos.flatten(2)


@pytest.mark.parametrize("F", [16, 64, 128])
def test_sine_embed_is_each_of_the_three_old_copies(F):
    mask = padded_masks(20, 30, [(20, 30), (11, 25)])
    assert torch.equal(PositionEmbeddingSine(F)(mask), old_position_embedding(mask, F))
    boxes = torch.rand(2, 7, 4)
    assert torch.equal(sine_embed(boxes, F), old_box_sine_embed(boxes, F))
    logits = torch.randn(2, 7, 4) * 3                      # two-stage: sigmoid of logits
    assert torch.equal(sine_embed(logits.sigmoid(), F), old_box_sine_embed(logits.sigmoid(), F))
    assert sine_embed(boxes, F).shape == (2, 7, 4 * F)


def test_level_start_index_is_the_transformer_formula():
    shapes = torch.tensor([[50, 67], [25, 34], [13, 17], [7, 9]])
    old = torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1]))
    assert torch.equal(level_start_index_of(shapes), old)
    assert level_start_index_of(shapes).tolist() == [0, 3350, 4200, 4421]


def test_decode_boxes_is_the_detector_and_the_decoder_formula():
    delta = torch.randn(2, 5, 4)
    boxes, points = torch.rand(2, 5, 4), torch.rand(2, 5, 2)
    assert torch.equal(decode_boxes(delta, boxes), (delta + inverse_sigmoid(boxes)).sigmoid())
    old = torch.cat([delta[..., :2] + inverse_sigmoid(points), delta[..., 2:]], -1).sigmoid()
    assert torch.equal(decode_boxes(delta, points), old)
    # a zero offset gives the reference back (to rounding); its size sigmoid(0) = 0.5
    torch.testing.assert_close(decode_boxes(torch.zeros(2, 5, 4), boxes), boxes)
    assert torch.equal(decode_boxes(torch.zeros(2, 5, 4), points)[..., 2:],
                       torch.full((2, 5, 2), 0.5))
