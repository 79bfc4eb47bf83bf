"""A 3x3 (DCNv1/v2) deformable convolution written as deformable attention.

The paper's reduction (Zhu et al., 2021, Section 4.1): with one level, one point per
head (L = K = 1) and the value projection W'_m fixed to the identity, deformable
attention is deformable convolution. Each head plays one kernel tap: head m reads the
map at the tap's grid position plus its offset, and W_m is the kernel's weight
matrix for that tap. A 3x3 kernel needs M = 9 heads.
"""
import torch

from .deform_attn import deform_attn


def deform_conv_as_attention(x, offset, kernel, mask=None):
    """``torchvision.ops.deform_conv2d(x, offset, kernel, padding=1, mask=mask)``, computed
    by ``deform_attn`` with M = 9 heads, K = 1 point, identity value projection.

    Args:
        x: (N, C_in, H, W) feature map.
        offset: (N, 2 * 9, H, W), per tap (dy, dx) in pixels, torchvision's layout.
        kernel: (C_out, C_in, 3, 3).
        mask: optional (N, 9, H, W) DCNv2 modulation scalars; they take the place of
            the attention weights A_mqk (which are 1 when K = 1 after the softmax).

    Returns:
        (N, H*W, C_out), the map flattened row by row as the Transformer stores it.
    """
    if x.dim() != 4 or tuple(kernel.shape[2:]) != (3, 3) or kernel.shape[1] != x.shape[1]:
        raise ValueError(f"expected x (N, C_in, H, W) and kernel (C_out, C_in, 3, 3), got "
                         f"{tuple(x.shape)} and {tuple(kernel.shape)}")
    N, C_in, H, W = x.shape
    if tuple(offset.shape) != (N, 18, H, W):
        raise ValueError(f"offset must be (N, 18, H, W) = {(N, 18, H, W)}, got {tuple(offset.shape)}")
    value = x.flatten(2).transpose(1, 2)[:, :, None].expand(-1, -1, 9, -1)  # W'_m = identity
    taps = torch.tensor([[i - 1.0, j - 1.0] for i in range(3) for j in range(3)],
                        dtype=x.dtype, device=x.device)                    # (9, 2) as (dy, dx)
    shift = taps + offset.reshape(N, 9, 2, H * W).permute(0, 3, 1, 2)       # (N, HW, 9, 2)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=x.dtype, device=x.device),
                            torch.arange(W, dtype=x.dtype, device=x.device), indexing="ij")
    centre = torch.stack([xs.flatten(), ys.flatten()], -1)                  # (HW, 2) as (x, y)
    scale = torch.tensor([W, H], dtype=x.dtype, device=x.device)
    loc = ((centre[:, None] + 0.5 + shift.flip(-1)) / scale)[:, :, :, None]  # (N, HW, 9, 1, 2)
    if mask is None:
        weights = x.new_ones(N, H * W, 9, 1)
    else:
        weights = mask.reshape(N, 9, H * W).transpose(1, 2)[..., None]
    heads = deform_attn(value, (H, W), loc, weights).view(N, H * W, 9, C_in)
    w_m = kernel.permute(2, 3, 0, 1).reshape(9, kernel.shape[0], C_in)      # tap m -> W_m
    return torch.einsum("nqmc,moc->nqo", heads, w_m)                        # sum_m W_m head_m
