import pytest
import torch
from torchvision.ops import deform_conv2d

from ddetr.ops.deform_conv import deform_conv_as_attention


@pytest.mark.parametrize("modulated", [False, True])
def test_deform_conv_as_attention_matches_torchvision(modulated):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 6, generator=g)
    kernel = torch.randn(4, 5, 3, 3, generator=g)
    offset = 1.5 * torch.randn(2, 18, 7, 6, generator=g)
    mask = torch.rand(2, 9, 7, 6, generator=g) if modulated else None
    ref = deform_conv2d(x, offset, kernel, padding=1, mask=mask).flatten(2).transpose(1, 2)
    torch.testing.assert_close(deform_conv_as_attention(x, offset, kernel, mask), ref,
                               atol=1e-4, rtol=1e-4)


def test_deform_conv_as_attention_rejects_bad_shapes():
    with pytest.raises(ValueError):
        deform_conv_as_attention(torch.zeros(1, 2, 4, 4), torch.zeros(1, 18, 4, 4),
                                 torch.zeros(3, 2, 5, 5))
