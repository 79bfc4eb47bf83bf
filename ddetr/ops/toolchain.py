"""Where the compilers, headers and libraries for the fused operator are, and its flags.

``ddetr.ops.kernel`` builds and loads the operator; this module only answers the
questions the build asks of the machine:

* the build folder (``$DDETR_BUILD_DIR``, else torch's default extensions folder);
* the compiler flags of the C++ part, and those the CUDA part adds: the include and
  library folders of the torch wheel's CUDA companion package and of the CUDA runtime
  (and, for both, the shared C++ runtime: SHARED_CXX_RUNTIME);
* the CUDA architectures to compile for when no GPU can be asked (``cuda_arch_list``).
"""
import contextlib
import logging
import os
import re
from pathlib import Path

import torch

try:  # the torch wheel's CUDA companion packages (nvidia-*-cu13), when installed
    import nvidia
except ImportError:
    nvidia = None

# arch list used when compiling CUDA code on a machine without a GPU (A100, H100)
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

# Link the C++ runtime that torch itself uses, the shared libstdc++, even where the
# compiler links its own copy statically (a GPU image's g++ wrapper did: CXX=/opt/gcc/
# bin/g++). Named by its file name (present wherever a C++ runtime is, development files
# or not) before the compiler's implicit libraries, the shared library resolves every
# std:: symbol and the static archive adds nothing. Two
# copies of libstdc++ in one process share no locale state: an extension's
# `stream << integer` then read the other copy's facets, and every error message with a
# number in it (TORCH_CHECK_VALUE(..., "got L=", L)) ended the process with a
# segmentation fault instead of raising (tests/test_toolchain.py reproduces it).
SHARED_CXX_RUNTIME = ["-l:libstdc++.so.6"]


def build_directory():
    """Where the compiled libraries are cached: $DDETR_BUILD_DIR, else None (torch's
    default, $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)."""
    path = os.environ.get("DDETR_BUILD_DIR")
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
    return path


def cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" line.

    torch logs that line when the module is first imported on a machine without a GPU;
    there only the CPU part is built, so it tells the reader nothing. Imported here,
    when a build is asked for, not with ddetr: it pulls in setuptools.
    """
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension as module
    finally:
        logger.setLevel(level)
    return module


def cuda_companion_paths():
    """([include folders], [library folders]) of the torch wheel's CUDA companion package.

    nvcc's own include folder may lack headers that torch's includes pull in
    (cusparse.h and friends); the ``nvidia-*-cu13`` wheels next to torch ship them
    under ``site-packages/nvidia/cu13/{include,lib}``.
    """
    includes, libs = [], []
    for root in map(Path, getattr(nvidia, "__path__", [])):
        for sub in ("cu13", "cu12"):
            if (root / sub / "include").is_dir():
                includes.append(str(root / sub / "include"))
            if (root / sub / "lib").is_dir():
                libs.append(str(root / sub / "lib"))
    return includes, libs


def cuda_runtime_lib_dirs():
    """Folders holding an unversioned libcudart.so, which the link step needs.

    torch guesses the toolkit's root from where ``nvcc`` is on the PATH; when that is a
    wrapper script (/usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc) the guess
    (/usr/local) has no libcudart.so, so we look in the usual places as well.
    """
    roots = [cpp_extension().CUDA_HOME, os.environ.get("CUDA_HOME"),
             os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    found = []
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            folder = Path(root) / sub
            if (folder / "libcudart.so").exists() and str(folder) not in found:
                found.append(str(folder))
    return found


def build_flags(include_dir, cuda):
    """The keyword arguments of ``cpp_extension.load`` that say how to compile.

    Args:
        include_dir: the folder of the operator's headers.
        cuda: also the flags of the CUDA part (companion headers, runtime libraries).

    Returns:
        dict with extra_include_paths, extra_cflags, extra_ldflags (and
        extra_cuda_cflags when cuda).
    """
    flags = dict(
        extra_include_paths=[str(include_dir)],
        # -O3 and OpenMP as torch itself is built: at::parallel_for only runs in
        # parallel when the code that calls it is compiled with OpenMP.
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"] + SHARED_CXX_RUNTIME,
    )
    if cuda:
        includes, libs = cuda_companion_paths()
        flags["extra_include_paths"] += includes
        flags["extra_ldflags"] = ([f"-L{lib}" for lib in libs + cuda_runtime_lib_dirs()]
                                  + SHARED_CXX_RUNTIME)
        flags["extra_cuda_cflags"] = ["-O3"]
    return flags


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


@contextlib.contextmanager
def compiling_for(arch_list):
    """TORCH_CUDA_ARCH_LIST set to ``arch_list`` for the duration of a CUDA build (the
    list that named the library, see cuda_library_name), restored afterwards; a no-op
    when arch_list is None (a CPU build)."""
    if arch_list is None:
        yield
        return
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
