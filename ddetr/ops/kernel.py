"""The fused multi-scale deformable attention operator: build, load, register.

The kernels live in ``ddetr/csrc/`` (C++ for the CPU, CUDA for the GPU) and are compiled
just in time with ``torch.utils.cpp_extension.load``, the first time they are needed.
The build is cached (by default under torch's extensions folder, or under
``$DDETR_BUILD_DIR``); it is redone only when a source file or a flag changes. What
the build needs from the machine (folders, flags, CUDA architectures) is found by
``ddetr.ops.toolchain``.

Two shared libraries, loaded into the process with ``is_python_module=False``, so that
their ``TORCH_LIBRARY`` registrations land in ``torch.ops.ddetr``:

    ddetr_msda_cpu           ddetr/csrc/ms_deform_attn_ops.cpp (the schema) + ms_deform_attn_cpu.cpp
    ddetr_msda_cuda_<archs>  ddetr/csrc/ms_deform_attn_cuda.cu (the CUDA implementation only)

The CUDA library's name carries the architectures it is compiled for (e.g.
``ddetr_msda_cuda_80_90ptx`` for ``TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"``), so a cached
build for one GPU is never loaded on a GPU of another architecture.

The CPU library is always built. The CUDA library is built when a GPU is present or
when asked for (``load_kernel(with_cuda=True)``, e.g. to check that it compiles on a
machine without a GPU). Keeping them apart means a CPU-only machine never needs nvcc.

When the kernel cannot run some tensors, ``check_available`` says why with one of two
exceptions: ``KernelBuildError`` (the build failed: ``backend="auto"`` warns once and
takes the next implementation) or ``KernelUnsupportedError`` (no kernel for that device,
dtype or number of levels: ``auto`` takes the next one silently). ``backend="kernel"``
raises either. (``ddetr.ops.ms_deform_attn.choose_backend`` is that choice.)

Once loaded, Python tells PyTorch the two things C++ did not (``registration.py``, the
same for the Triton operator): the output shapes for torch.compile and torch.export,
and that the backward of ``ms_deform_attn`` is the op ``ms_deform_attn_backward``.
"""
import time
import warnings
from pathlib import Path

import torch

from . import toolchain
from .checks import check_ms_deform_attn_inputs, checked_levels
from .registration import register_pair
from .toolchain import (DEFAULT_CUDA_ARCH_LIST, cuda_arch_list,  # noqa: F401 (kernel.*)
                        cuda_library_name)

CSRC = Path(__file__).resolve().parents[1] / "csrc"  # shipped inside the package
CPU_SOURCES = ("ms_deform_attn_ops.cpp", "ms_deform_attn_cpu.cpp")
CUDA_SOURCES = ("ms_deform_attn_cuda.cu",)
HEADERS = ("ms_deform_attn.h",)

# dtypes each device's kernel is compiled for (AT_DISPATCH_* in ddetr/csrc/)
SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
# the CUDA kernel takes its level table by value, with room for this many levels
# (kMaxLevels in ddetr/csrc/ms_deform_attn_cuda.cu)
CUDA_MAX_LEVELS = 16


class KernelUnavailableError(RuntimeError):
    """The fused kernel cannot run the given tensors (one of the two reasons below)."""


class KernelBuildError(KernelUnavailableError):
    """The fused kernel failed to build or load; the message holds the compiler's reason."""


class KernelUnsupportedError(KernelUnavailableError):
    """The fused kernel has no implementation for the tensors' device or dtype."""


# What happened when each part was loaded: None (not tried yet), True (loaded), or the
# error message of a failed build. Kept per process, so a failed build is tried once.
_loaded = {"cpu": None, "cuda": None}
_build_seconds = {}
_registered = False
_warned = set()


def _build(name, sources, arch_list, verbose):
    """Compile (or find cached) one library; arch_list: None for the CPU part, else the
    CUDA architectures that its name was made from."""
    cpp_extension = toolchain.cpp_extension()
    cuda = arch_list is not None
    start = time.perf_counter()
    with toolchain.compiling_for(arch_list):
        cpp_extension.load(name=name, sources=[str(CSRC / s) for s in sources],
                           build_directory=toolchain.build_directory(),
                           is_python_module=False, verbose=verbose,
                           **toolchain.build_flags(CSRC, cuda))
    _build_seconds[name] = time.perf_counter() - start


def _load_part(part, verbose=False):
    """Build (or find cached) and load one part; remember success or the error."""
    if _loaded[part] is None:
        arch_list = None if part == "cpu" else cuda_arch_list()
        name = "ddetr_msda_cpu" if part == "cpu" else cuda_library_name(arch_list)
        sources = CPU_SOURCES if part == "cpu" else CUDA_SOURCES
        try:
            _build(name, sources, arch_list, verbose=verbose)
            _loaded[part] = True
        except Exception as err:  # a compiler error, a missing tool, ... keep the reason
            lines = [line.strip() for line in str(err).strip().splitlines()]
            # the compiler's or linker's first complaint says more than ninja's
            # "build stopped" (torch puts the build log into the error message)
            complaints = [line for line in lines
                          if "error:" in line or "cannot find" in line or "fatal" in line]
            detail = " | ".join(complaints[:2]) or (lines or [""])[0]
            _loaded[part] = (f"{type(err).__name__} building {name}: {detail} "
                             f"(load_kernel(verbose=True) shows the full log)")
    return _loaded[part] is True


def load_kernel(with_cuda=None, verbose=False):
    """Build and load the fused operator; return which parts are available.

    Args:
        with_cuda: build the CUDA part too. None (default): only if a GPU is present.
        verbose: show the compiler's commands and output.

    Returns:
        dict with "cpu" and "cuda": True if loaded, None if not tried, else the error;
        and "seconds": time spent in each build call (near zero when cached).
    """
    if with_cuda is None:
        with_cuda = torch.cuda.is_available()
    if _load_part("cpu", verbose) and with_cuda:
        _load_part("cuda", verbose)
    if _loaded["cpu"] is True:
        _register_python_parts()
    return dict(cpu=_loaded["cpu"], cuda=_loaded["cuda"], seconds=dict(_build_seconds))


# ---- what Python adds to the C++ operator --------------------------------------------

def _register_python_parts():
    global _registered
    if not _registered:
        _registered = True
        register_pair("ddetr::ms_deform_attn", "ddetr::ms_deform_attn_backward")


# ---- choosing and calling the kernel ---------------------------------------------------

@torch.compiler.disable
def _first_load(device):
    """The first build/load, run eagerly even when torch.compile traces the caller.

    Compiling and loading a library cannot be traced: under torch.compile this call is
    a graph break, once (later traces find the kernel loaded). With
    ``fullgraph=True`` graph breaks are errors, so call ``load_kernel()`` (or run
    ``python -m ddetr bench build``) before compiling.
    """
    load_kernel(with_cuda=(device == "cuda"))


def check_available(value, num_levels=None):
    """Raise unless the fused kernel can run on ``value``'s device and dtype (and, when
    given, ``num_levels`` levels).

    Builds the kernel for the device on first use.

    Raises:
        KernelUnsupportedError: the kernel has no implementation for the device, dtype
            or number of levels.
        KernelBuildError: the kernel for the device failed to build or load.
    """
    device = value.device.type
    if device not in SUPPORTED_DTYPES:
        raise KernelUnsupportedError(
            f"the fused kernel has no implementation for device {value.device}")
    if value.dtype not in SUPPORTED_DTYPES[device]:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES[device])
        raise KernelUnsupportedError(
            f"the fused {device} kernel supports {names}; got {value.dtype}")
    if device == "cuda" and num_levels is not None and num_levels > CUDA_MAX_LEVELS:
        raise KernelUnsupportedError(f"the fused CUDA kernel takes at most {CUDA_MAX_LEVELS} "
                                     f"levels, got L={num_levels}")
    if _loaded[device] is None:
        _first_load(device)
    if _loaded["cpu"] is not True:
        raise KernelBuildError(f"the fused kernel failed to build: {_loaded['cpu']}")
    if _loaded[device] is not True:
        raise KernelBuildError(f"the fused {device} kernel failed to build: {_loaded[device]}")


def warn_once(reason):
    """One warning per distinct reason, so a failing build does not flood the log."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"ms_deform_attn: using the pure PyTorch reference because {reason}",
                      RuntimeWarning, stacklevel=3)


def ms_deform_attn_kernel(value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights):
    """The fused operator: same arguments and result as ``ms_deform_attn_reference``.

    Checks the arguments, moves ``spatial_shapes`` and ``level_start_index`` to the
    device of ``value`` and makes every tensor contiguous (the kernels index raw
    memory), then calls ``torch.ops.ddetr.ms_deform_attn``. Raises
    KernelUnsupportedError or KernelBuildError (both RuntimeErrors) if the kernel
    cannot be used for these tensors.

    Returns:
        (N, Lq, M * D)
    """
    # The level tables are checked against S once per pair of tensors (checks.py: no
    # device sync after the first call, none at all for tables from level_tables()),
    # and the kernel gets the checked host copies: the CUDA kernel takes its level
    # table by value, so it never reads the tables back from the GPU. Under
    # torch.compile the tables cannot be read here (fake tensors): the C++ entry point
    # checks them (copying tables that live on the GPU to the host: one sync per call).
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights, check_values=False)
    try:
        check_available(value, spatial_shapes.shape[0])
    except KernelUnavailableError as err:
        raise type(err)(f"ms_deform_attn backend='kernel': {err}") from None
    if not torch.compiler.is_compiling():
        spatial_shapes, level_start_index = checked_levels(
            spatial_shapes, level_start_index, value.shape[1]).host
    elif spatial_shapes.device.type != "cpu" or level_start_index.device.type != "cpu":
        spatial_shapes = spatial_shapes.to(value.device)
        level_start_index = level_start_index.to(value.device)
    return torch.ops.ddetr.ms_deform_attn(
        value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
        sampling_locations.contiguous(), attention_weights.contiguous())
