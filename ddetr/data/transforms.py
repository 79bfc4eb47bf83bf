"""Detection transforms on (image, target) pairs, built from torchvision.transforms.v2.

The boxes travel as ``tv_tensors.BoundingBoxes`` (XYXY, absolute pixels), so every
geometric transform moves them with the image; ``SanitizeBoundingBoxes`` then drops
the boxes that a crop reduced to nothing, together with their labels.

Training follows DETR's recipe, scaled to the preset's resolution: horizontal flip,
then either a multi-scale resize, or a resize + random crop + multi-scale resize.
"""
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomSizeCrop(v2.Transform):
    """Crop a random window with height and width drawn in [min_size, max_size]
    (each at most the image's), at a random place. Uses torch's RNG."""

    def __init__(self, min_size, max_size):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs):
        h, w = query_size(flat_inputs)
        th = int(torch.randint(min(h, self.min_size), min(h, self.max_size) + 1, ()))
        tw = int(torch.randint(min(w, self.min_size), min(w, self.max_size) + 1, ()))
        top = int(torch.randint(0, h - th + 1, ()))
        left = int(torch.randint(0, w - tw + 1, ()))
        return dict(top=top, left=left, height=th, width=tw)

    def transform(self, inpt, params):
        return self._call_kernel(F.crop, inpt, **params)


def _finish():
    return [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def make_transforms(train, scales, max_size, val_scale=None):
    """The transform of a split.

    Args:
        train: True for augmentation, False for a fixed resize.
        scales: candidate lengths of the shorter side when training.
        max_size: bound on the longer side.
        val_scale: shorter side for evaluation (default: max(scales)).
    Returns:
        callable (image, target) -> (image tensor (3, H, W) normalised, target).
    """
    if not train:
        size = val_scale or max(scales)
        return v2.Compose([v2.ToImage(), v2.RandomShortestSize([size], max_size)]
                          + _finish())
    # DETR crops after resizing to 400-600 and crops 384-600, for 800-pixel scales
    f = max(scales) / 800
    pre = [round(s * f) for s in (400, 500, 600)]
    crop = RandomSizeCrop(round(384 * f), round(600 * f))
    return v2.Compose([
        v2.ToImage(),
        v2.RandomHorizontalFlip(),
        v2.RandomChoice([
            v2.RandomShortestSize(list(scales), max_size),
            v2.Compose([v2.RandomShortestSize(pre), crop,
                        v2.RandomShortestSize(list(scales), max_size)]),
        ]),
    ] + _finish())


def check_resizable(width, height, scale, max_size, name="image"):
    """Raise ValueError unless an image of width x height survives the evaluation resize
    (shorter side to scale, longer side at most max_size, as RandomShortestSize computes
    it) with at least 1 pixel a side: its longer side at most max_size times its shorter.
    The models take any size from 1 pixel up (the backbone pads, two-stage proposals
    take as many tokens as there are)."""
    ratio = min(scale / min(width, height), max_size / max(width, height))
    if int(min(width, height) * ratio) < 1:
        raise ValueError(f"{name} is {width}x{height} pixels: resized to the model's scale "
                         f"(shorter side {scale}, longer side at most {max_size}) its shorter "
                         f"side would be {min(width, height) * ratio:.2f} pixels; expected an "
                         f"image whose longer side is at most {max_size} times its shorter "
                         f"side")


def to_model_target(image, target):
    """Convert transformed XYXY absolute boxes to (cx, cy, w, h) normalised to the
    image size, as the model and criterion expect; adds "size" (h, w)."""
    boxes = target["boxes"]
    h, w = boxes.canvas_size
    boxes = F.convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
    boxes = boxes.as_subclass(torch.Tensor) / torch.tensor([w, h, w, h], dtype=torch.float32)
    out = dict(target)
    out["boxes"] = boxes
    out["size"] = torch.tensor([h, w], dtype=torch.int64)
    return out
