"""Batching images of different sizes: pad to the largest, with a padding mask."""
import torch


def collate(batch):
    """[(image (3, H_i, W_i), target), ...] -> (images (N, 3, H, W), masks (N, H, W)
    bool with True on padding, list of targets)."""
    images, targets = zip(*batch)
    h = max(img.shape[-2] for img in images)
    w = max(img.shape[-1] for img in images)
    out = images[0].new_zeros((len(images), 3, h, w))
    masks = torch.ones((len(images), h, w), dtype=torch.bool)
    for i, img in enumerate(images):
        out[i, :, :img.shape[-2], :img.shape[-1]] = img
        masks[i, :img.shape[-2], :img.shape[-1]] = False
    return out, masks, list(targets)
