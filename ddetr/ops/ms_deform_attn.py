"""The public multi-scale deformable attention operator and its backend choice.

``ms_deform_attn`` is what the model calls. ``choose_backend`` decides what runs:
with ``backend="auto"``, the first fused implementation of ``AUTO_ORDER`` for the
tensor's device that can run these tensors (the C++/CUDA op of ``ddetr/csrc``, then on a
GPU the Triton kernels), else the pure PyTorch reference. The result is the same
whichever runs, up to floating-point rounding.
"""
import torch

from . import kernel
from .ms_deform_attn_reference import ms_deform_attn_reference

BACKENDS = ("auto", "reference", "kernel", "triton")

# What "auto" tries, by device, before the reference. Timed on an H200
# (benchmarks/kernels.md): the CUDA op's forward+backward is faster than Triton's at
# every benchmark shape and dtype; Triton serves a GPU machine without nvcc. On a CPU,
# Triton runs only under its interpreter, which is for tests: never chosen there.
AUTO_ORDER = {"cuda": ("kernel", "triton"), "cpu": ("kernel",)}


def _num_levels(spatial_shapes):
    """L of a (L, 2) table, None for anything else (the implementations say what is wrong)."""
    ok = isinstance(spatial_shapes, torch.Tensor) and spatial_shapes.dim() > 0
    return spatial_shapes.shape[0] if ok else None


def _check_available(choice, value, num_levels):
    """Raise unless the fused implementation `choice` can run on these tensors."""
    if choice == "kernel":
        kernel.check_available(value, num_levels)
    else:
        from . import ms_deform_attn_triton  # imported on first use: only its users need Triton
        ms_deform_attn_triton.check_available(value)


def check_backend(backend, device, num_levels=None):
    """Raise unless ``backend`` can run on ``device`` (a torch.device) with float32
    values: the check ``ms_deform_attn`` makes on its first call, for an entry check
    (a config's attention_backend, before data is made). "auto" and "reference" always
    can. Raises what the implementation raises (KernelUnavailableError: unsupported,
    not built; ImportError: no Triton)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("kernel", "triton"):
        _check_available(backend, torch.empty(0, device=device), num_levels)


def choose_backend(value, spatial_shapes, backend="auto"):
    """The implementation ``ms_deform_attn`` runs for these tensors: ``backend`` itself,
    unless it is "auto"; then the first entry of ``AUTO_ORDER[device]`` that can run
    them, else "reference". A fused implementation that failed to build is reported with
    one warning (per reason, per process); one that does not support the device, the
    dtype or the number of levels is skipped silently."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto" or not isinstance(value, torch.Tensor):
        return "reference" if backend == "auto" else backend
    for choice in AUTO_ORDER.get(value.device.type, ()):
        try:
            _check_available(choice, value, _num_levels(spatial_shapes))
            return choice
        except kernel.KernelBuildError as err:
            kernel.warn_once(str(err))
        except (kernel.KernelUnsupportedError, ImportError):  # Triton's too, or no Triton
            pass
    return "reference"


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, backend="auto"):
    """Multi-scale deformable attention.

    Args:
        value: (N, S, M, D), S = sum of H_l * W_l over the L levels.
        spatial_shapes: (L, 2) int64 as (H, W).
        level_start_index: (L,) int64.
        sampling_locations: (N, Lq, M, L, K, 2), (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, K).
        backend: "auto" (``choose_backend``: a fused implementation where one can run,
            else the reference), "reference" (pure PyTorch), "kernel" (the fused C++/CUDA
            op; raises if it cannot be built or does not support the device, dtype or
            number of levels) or "triton" (the Triton kernels; raises on a CPU tensor
            unless TRITON_INTERPRET=1).

    Returns:
        (N, Lq, M * D)
    """
    backend = choose_backend(value, spatial_shapes, backend)
    if backend == "triton":
        try:
            from .ms_deform_attn_triton import ms_deform_attn_triton
        except ImportError as err:
            raise RuntimeError(f"ms_deform_attn backend='triton': Triton cannot be imported "
                               f"({err})") from err
        return ms_deform_attn_triton(value, spatial_shapes, level_start_index,
                                     sampling_locations, attention_weights)
    if backend == "kernel":
        return kernel.ms_deform_attn_kernel(value, spatial_shapes, level_start_index,
                                            sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights)
