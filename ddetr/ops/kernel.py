"""The fused multi-scale deformable attention operator: build, load, register.

The kernels live in ``ddetr/csrc/`` (C++ for the CPU, CUDA for the GPU) and are compiled
just in time with ``torch.utils.cpp_extension.load``, the first time they are needed.
The build is cached (by default under torch's extensions folder, or under
``$DDETR_BUILD_DIR``); it is redone only when a source file or a flag changes.

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

Once loaded, Python tells PyTorch the two things C++ did not:

* ``torch.library.register_fake``: the output shapes, so torch.compile and
  torch.export can trace the op without running it;
* ``torch.library.register_autograd``: the backward of ``ms_deform_attn`` is the op
  ``ms_deform_attn_backward``.
"""
import logging
import os
import re
import time
import warnings
from pathlib import Path

import torch

from .checks import check_ms_deform_attn_inputs, checked_levels

CSRC = Path(__file__).resolve().parents[1] / "csrc"  # shipped inside the package
CPU_SOURCES = ("ms_deform_attn_ops.cpp", "ms_deform_attn_cpu.cpp")
CUDA_SOURCES = ("ms_deform_attn_cuda.cu",)
HEADERS = ("ms_deform_attn.h",)

# dtypes each device's kernel is compiled for (AT_DISPATCH_* in ddetr/csrc/)
SUPPORTED_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
# arch list used when compiling CUDA code on a machine without a GPU (A100, H100)
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

# What happened when each part was loaded: None (not tried yet), True (loaded), or the
# error message of a failed build. Kept per process, so a failed build is tried once.
_loaded = {"cpu": None, "cuda": None}
_build_seconds = {}
_registered = False
_warned = set()


def build_directory():
    """Where the compiled libraries are cached: $DDETR_BUILD_DIR, else torch's default."""
    path = os.environ.get("DDETR_BUILD_DIR")
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
    return path


def cuda_arch_list():
    """The architectures the CUDA part is compiled for, as TORCH_CUDA_ARCH_LIST spells them.

    $TORCH_CUDA_ARCH_LIST if set; else, as torch decides it, the compute capabilities
    of the visible GPUs (capped at the newest one this torch supports) with +PTX on the
    last; without a GPU, DEFAULT_CUDA_ARCH_LIST.
    """
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env and env != "native":
        return env
    if not torch.cuda.is_available():
        return DEFAULT_CUDA_ARCH_LIST
    supported = [tuple(divmod(int(re.sub(r"\D", "", a)), 10)) for a in torch.cuda.get_arch_list()
                 if a.startswith("sm_")]
    caps = sorted({min(torch.cuda.get_device_capability(i), max(supported, default=(99, 9)))
                   for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"


def cuda_library_name(arch_list):
    """The CUDA library's name for an arch list: "8.0;9.0+PTX" -> "ddetr_msda_cuda_80_90ptx".

    Builds for different arch lists get different names, hence different cache folders
    and files: a library compiled for one GPU is never reused on another.
    """
    parts = [re.sub(r"[^0-9a-z]", "", part.lower())
             for part in re.split(r"[;,\s]+", arch_list.strip()) if part]
    if not parts:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST must name at least one architecture, "
                         f"got {arch_list!r}")
    return "ddetr_msda_cuda_" + "_".join(parts)


def _cuda_companion_paths():
    """Include and library folders of the torch wheel's CUDA companion package.

    nvcc's own include folder may lack headers that torch's includes pull in
    (cusparse.h and friends); the ``nvidia-*-cu13`` wheels next to torch ship them
    under ``site-packages/nvidia/cu13/{include,lib}``.
    """
    try:
        import nvidia
    except ImportError:
        return [], []
    includes, libs = [], []
    for root in map(Path, getattr(nvidia, "__path__", [])):
        for sub in ("cu13", "cu12"):
            if (root / sub / "include").is_dir():
                includes.append(str(root / sub / "include"))
            if (root / sub / "lib").is_dir():
                libs.append(str(root / sub / "lib"))
    return includes, libs


def _cuda_runtime_lib_dirs():
    """Folders holding an unversioned libcudart.so, which the link step needs.

    torch guesses the toolkit's root from where ``nvcc`` is on the PATH; when that is a
    wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc) the guess
    (/usr/local) has no libcudart.so, so we look in the usual places as well.
    """
    cpp_extension = _cpp_extension()
    roots = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             "/usr/local/cuda"]
    found = []
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            folder = Path(root) / sub
            if (folder / "libcudart.so").exists() and str(folder) not in found:
                found.append(str(folder))
    return found


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" line.

    torch logs that line when the module is first imported on a machine without a GPU;
    there only the CPU part is built, so it tells the reader nothing.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _build(name, sources, cuda, verbose):
    cpp_extension = _cpp_extension()

    kwargs = dict(
        name=name,
        sources=[str(CSRC / s) for s in sources],
        extra_include_paths=[str(CSRC)],
        # -O3 and OpenMP as torch itself is built: at::parallel_for only runs in
        # parallel when the code that calls it is compiled with OpenMP.
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=build_directory(),
        is_python_module=False,
        verbose=verbose,
    )
    if cuda:
        includes, libs = _cuda_companion_paths()
        kwargs["extra_include_paths"] += includes
        kwargs["extra_ldflags"] = [f"-L{lib}" for lib in libs + _cuda_runtime_lib_dirs()]
        kwargs["extra_cuda_cflags"] = ["-O3"]
    saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cuda:  # compile for exactly the list that named the library (cuda_library_name)
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    start = time.perf_counter()
    try:
        cpp_extension.load(**kwargs)
    finally:
        if cuda and saved_arch is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        elif cuda:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
    _build_seconds[name] = time.perf_counter() - start


def _load_part(part, verbose=False):
    """Build (or find cached) and load one part; remember success or the error."""
    if _loaded[part] is None:
        name = "ddetr_msda_cpu" if part == "cpu" else cuda_library_name(cuda_arch_list())
        sources = CPU_SOURCES if part == "cpu" else CUDA_SOURCES
        try:
            _build(name, sources, cuda=(part == "cuda"), verbose=verbose)
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
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("ddetr::ms_deform_attn")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights):
        N, _, M, D = value.shape
        Lq = sampling_locations.shape[1]
        return value.new_empty(N, Lq, M * D)

    @torch.library.register_fake("ddetr::ms_deform_attn_backward")
    def _backward_fake(grad_output, value, spatial_shapes, level_start_index,
                       sampling_locations, attention_weights):
        return (torch.empty_like(value), torch.empty_like(sampling_locations),
                torch.empty_like(attention_weights))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.ddetr.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, locations,
            weights)
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd("ddetr::ms_deform_attn", backward,
                                    setup_context=setup_context)


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


def unavailable_reason(value):
    """None if the fused kernel can run on ``value``'s device and dtype, else why not.

    Builds the kernel for the device on first use.
    """
    device = value.device.type
    if device not in SUPPORTED_DTYPES:
        return f"the fused kernel has no implementation for device {value.device}"
    if value.dtype not in SUPPORTED_DTYPES[device]:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES[device])
        return f"the fused {device} kernel supports {names}; got {value.dtype}"
    if _loaded[device] is None:
        _first_load(device)
    if _loaded["cpu"] is not True:
        return f"the fused kernel failed to build: {_loaded['cpu']}"
    if _loaded[device] is not True:
        return f"the fused {device} kernel failed to build: {_loaded[device]}"
    return None


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
    memory), then calls ``torch.ops.ddetr.ms_deform_attn``. Raises RuntimeError if the
    kernel cannot be used for these tensors.

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
    if not torch.compiler.is_compiling():
        spatial_shapes, level_start_index = checked_levels(
            spatial_shapes, level_start_index, value.shape[1]).host
    elif spatial_shapes.device.type != "cpu" or level_start_index.device.type != "cpu":
        spatial_shapes = spatial_shapes.to(value.device)
        level_start_index = level_start_index.to(value.device)
    reason = unavailable_reason(value)
    if reason is not None:
        raise RuntimeError(f"ms_deform_attn backend='kernel': {reason}")
    return torch.ops.ddetr.ms_deform_attn(
        value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
        sampling_locations.contiguous(), attention_weights.contiguous())
