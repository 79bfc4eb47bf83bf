"""The public multi-scale deformable attention operator and its backend choice.

``ms_deform_attn`` is what the model calls. It runs the fused kernel (C++ on CPU,
CUDA on GPU) when one can be used for the tensors' device, and otherwise the pure
PyTorch reference. The result is the same either way, up to floating-point rounding.
"""
import torch

from . import kernel
from .ms_deform_attn_reference import ms_deform_attn_reference

BACKENDS = ("auto", "reference", "kernel")


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, backend="auto"):
    """Multi-scale deformable attention.

    Args:
        value: (N, S, M, D), S = sum of H_l * W_l over the L levels.
        spatial_shapes: (L, 2) int64 as (H, W).
        level_start_index: (L,) int64.
        sampling_locations: (N, Lq, M, L, K, 2), (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, K).
        backend: "auto" (fused kernel for the device if it can be used, else the
            reference), "reference" (pure PyTorch) or "kernel" (fused; raises if it
            cannot be built or does not support the device or dtype).

    Returns:
        (N, Lq, M * D)

    With "auto", a kernel that fails to build gives one warning (with the compiler's
    reason) and the reference from then on; a dtype the kernel does not support on
    that device (float16 on the CPU) goes to the reference silently.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and isinstance(value, torch.Tensor):
        try:
            kernel.check_available(value)
            backend = "kernel"
        except kernel.KernelBuildError as err:
            kernel.warn_once(str(err))
            backend = "reference"
        except kernel.KernelUnsupportedError:
            backend = "reference"
    if backend == "kernel":
        return kernel.ms_deform_attn_kernel(value, spatial_shapes, level_start_index,
                                            sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights)
