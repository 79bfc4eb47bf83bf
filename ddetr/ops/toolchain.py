"""Where the compilers, headers and libraries for the fused operator are, and its flags.

``ddetr.ops.kernel`` builds and loads the operator; this module only answers the
questions the build asks of the machine:

* the build folder (``$DDETR_BUILD_DIR``, else torch's default extensions folder);
* the compiler flags of the C++ part, and those the CUDA part adds: the include and
  library folders of the torch wheel's CUDA companion package and of the CUDA runtime;
* the CUDA architectures to compile for when no GPU can be asked (``cuda_arch_list``).
"""
import contextlib
import logging
import os
from pathlib import Path

import torch

try:  # the torch wheel's CUDA companion packages (nvidia-*-cu13), when installed
    import nvidia
except ImportError:
    nvidia = None

# arch list used when compiling CUDA code on a machine without a GPU (A100, H100)
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


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
        extra_ldflags=["-fopenmp"],
    )
    if cuda:
        includes, libs = cuda_companion_paths()
        flags["extra_include_paths"] += includes
        flags["extra_ldflags"] = [f"-L{lib}" for lib in libs + cuda_runtime_lib_dirs()]
        flags["extra_cuda_cflags"] = ["-O3"]
    return flags


@contextlib.contextmanager
def cuda_arch_list(cuda):
    """Set TORCH_CUDA_ARCH_LIST to DEFAULT_CUDA_ARCH_LIST for the duration of a CUDA
    build on a machine without a GPU (torch cannot ask a device for its architecture
    there) unless the user set it; leave everything as it is otherwise."""
    if not cuda or os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        yield
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    try:
        yield
    finally:
        del os.environ["TORCH_CUDA_ARCH_LIST"]
