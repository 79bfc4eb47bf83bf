"""The official Deformable-DETR CUDA operator, built at run time from a checkout the
user names, for side-by-side benchmarks (``python -m ddetr bench kernels --official
PATH``).

Nothing of that repository enters this one: ``load_official_op(PATH)`` copies its
``models/ops/src`` into a build folder, updates the calls that current PyTorch no longer
has (``.type()`` for device and dtype, ``.data<T>()``, ``AT_ASSERTM``/``AT_ERROR``, the
``THC`` atomics header), and compiles it with ``torch.utils.cpp_extension`` with the
flags of its own ``setup.py``. ``official_ms_deform_attn`` calls it the way its
``MSDeformAttnFunction`` does (forward and backward through one autograd function,
``im2col_step`` = 64 as in its model). Its kernels are written for float32 and float64.
"""
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..ops import toolchain

SOURCES = ("vision.cpp", "cpu/ms_deform_attn_cpu.cpp", "cuda/ms_deform_attn_cuda.cu")

# (pattern, replacement): the API of 2020's PyTorch -> today's
UPDATES = [
    (r"\.type\(\)\.is_cuda\(\)", ".is_cuda()"),
    (r"AT_DISPATCH_FLOATING_TYPES\((\w+)\.type\(\)", r"AT_DISPATCH_FLOATING_TYPES(\1.scalar_type()"),
    (r"\.data<", ".data_ptr<"),
    (r"AT_ASSERTM\(", "TORCH_CHECK("),
    (r"AT_ERROR\(", "TORCH_CHECK(false, "),
    (r"#include <THC/THCAtomics\.cuh>", "#include <ATen/cuda/Atomic.cuh>"),
]

_module = None


def updated_sources(checkout, folder):
    """Copy the checkout's models/ops/src into `folder` with UPDATES applied; returns
    the paths of SOURCES there."""
    src = Path(checkout) / "models" / "ops" / "src"
    if not (src / "cuda" / "ms_deform_attn_cuda.cu").is_file():
        raise ValueError(f"--official expects a Deformable-DETR checkout (with "
                         f"models/ops/src/cuda/ms_deform_attn_cuda.cu), got {checkout}")
    dest = Path(folder) / "src"
    shutil.copytree(src, dest, dirs_exist_ok=True)
    for path in dest.rglob("*"):
        if path.suffix in (".h", ".cpp", ".cu", ".cuh"):
            text = path.read_text()
            for pattern, replacement in UPDATES:
                text = re.sub(pattern, replacement, text)
            path.write_text(text)
    return [str(dest / s) for s in SOURCES], str(dest)


def load_official_op(checkout, verbose=False):
    """Build (once per process) and return the official op's Python module, with
    ms_deform_attn_forward(value, shapes, starts, loc, w, im2col_step) and
    ms_deform_attn_backward(value, shapes, starts, loc, w, grad_out, im2col_step)."""
    global _module
    if _module is None:
        cpp_extension = toolchain.cpp_extension()
        folder = Path(toolchain.build_directory() or tempfile.gettempdir()) / "official_msda"
        sources, include = updated_sources(checkout, folder)
        includes, _ = toolchain.cuda_companion_paths()
        _module = cpp_extension.load(
            name="official_msda", sources=sources, extra_include_paths=[include] + includes,
            extra_cflags=["-O3", "-DWITH_CUDA"],
            extra_cuda_cflags=["-O3", "-DWITH_CUDA", "-DCUDA_HAS_FP16=1",
                               "-D__CUDA_NO_HALF_OPERATORS__",
                               "-D__CUDA_NO_HALF_CONVERSIONS__",
                               "-D__CUDA_NO_HALF2_OPERATORS__"],
            extra_ldflags=[f"-L{d}" for d in toolchain.cuda_runtime_lib_dirs()]
            + toolchain.SHARED_CXX_RUNTIME,
            build_directory=str(folder), verbose=verbose)
    return _module


def official_module():
    """The module load_official_op built in this process."""
    if _module is None:
        raise RuntimeError("the official op is not built: call load_official_op(checkout) first")
    return _module


class _OfficialFunction(torch.autograd.Function):
    """The official MSDeformAttnFunction's forward and backward, on the built module."""

    @staticmethod
    def forward(ctx, value, shapes, starts, loc, w, im2col_step):
        ctx.im2col_step = im2col_step
        ctx.save_for_backward(value, shapes, starts, loc, w)
        return official_module().ms_deform_attn_forward(value, shapes, starts, loc, w,
                                                        im2col_step)

    @staticmethod
    def backward(ctx, grad_output):
        value, shapes, starts, loc, w = ctx.saved_tensors
        grad_value, grad_loc, grad_w = official_module().ms_deform_attn_backward(
            value, shapes, starts, loc, w, grad_output.contiguous(), ctx.im2col_step)
        return grad_value, None, None, grad_loc, grad_w, None


def official_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, im2col_step=64):
    """ms_deform_attn's arguments and result, computed by the official CUDA op (call
    load_official_op first). float32/float64 CUDA tensors only; the tables on the GPU."""
    device = value.device
    return _OfficialFunction.apply(value, spatial_shapes.to(device),
                                   level_start_index.to(device), sampling_locations,
                                   attention_weights, im2col_step)
