"""The public multi-scale deformable attention operator and its backend choice.

``ms_deform_attn`` is what the model calls. It runs the fused kernel (C++ on CPU,
CUDA on GPU) when one can be used for the tensors' device, and otherwise the pure
PyTorch reference. On a GPU the Triton kernels are a second fused implementation
(``AUTO_ON_CUDA`` says which is tried first). The result is the same either way, up
to floating-point rounding.
"""
import torch

from . import kernel
from .ms_deform_attn_reference import ms_deform_attn_reference

BACKENDS = ("auto", "reference", "kernel", "triton")

# What "auto" runs on a CUDA tensor, by the dtype of value: the first choice that can
# run there ("kernel": the CUDA op of ddetr/csrc, if it builds; "triton": the Triton
# kernels, if Triton imports; "reference": always). Timed on an H200
# (benchmarks/kernels.md): the CUDA op's forward+backward is faster than Triton's at
# every benchmark shape and dtype, so it comes first; Triton serves a GPU machine
# without nvcc.
AUTO_ON_CUDA = {
    torch.float32: ("kernel", "triton", "reference"),
    torch.float64: ("kernel", "triton", "reference"),
    torch.float16: ("kernel", "triton", "reference"),
    torch.bfloat16: ("kernel", "triton", "reference"),
}


def _num_levels(spatial_shapes):
    """L of a (L, 2) table, None for anything else (the implementations say what is wrong)."""
    ok = isinstance(spatial_shapes, torch.Tensor) and spatial_shapes.dim() > 0
    return spatial_shapes.shape[0] if ok else None


def _auto_on_cuda(value, num_levels):
    """The first entry of AUTO_ON_CUDA[value.dtype] that can run on ``value``; "auto"
    (the rule for every device below, with its warning) if none of the fused ones can."""
    for choice in AUTO_ON_CUDA.get(value.dtype, ()):
        if choice == "reference":
            return choice
        if choice == "kernel":
            try:
                kernel.check_available(value, num_levels)
                return choice
            except kernel.KernelUnavailableError:
                continue
        if choice == "triton":
            try:  # imported on first use: only its users need Triton
                from . import ms_deform_attn_triton
            except ImportError:
                continue
            try:
                ms_deform_attn_triton.check_available(value)
                return choice
            except ms_deform_attn_triton.TritonUnavailableError:
                continue
    return "auto"


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
            reference), "reference" (pure PyTorch), "kernel" (fused; raises if it
            cannot be built or does not support the device or dtype) or "triton"
            (the Triton kernels; raises on a CPU tensor unless TRITON_INTERPRET=1).

    Returns:
        (N, Lq, M * D)

    With "auto", a kernel that fails to build gives one warning (with the compiler's
    reason) and the reference from then on; a dtype the kernel does not support on
    that device (float16 on the CPU) goes to the reference silently. On a CUDA tensor
    "auto" takes the first implementation of ``AUTO_ON_CUDA[value.dtype]`` that can
    run; on a CPU tensor it never takes Triton (the interpreter is for tests).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and isinstance(value, torch.Tensor) and value.device.type == "cuda":
        backend = _auto_on_cuda(value, _num_levels(spatial_shapes))
    if backend == "triton":
        try:
            from .ms_deform_attn_triton import ms_deform_attn_triton
        except ImportError as err:
            raise RuntimeError(f"ms_deform_attn backend='triton': Triton cannot be imported "
                               f"({err})") from err
        return ms_deform_attn_triton(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights)
    if backend == "auto" and isinstance(value, torch.Tensor):
        try:
            kernel.check_available(value, _num_levels(spatial_shapes))
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
