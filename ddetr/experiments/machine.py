"""What a recorded result says about where and from what it was made: the machine, the
git commit of the working directory, and how busy the machine was."""
import os
import platform
import subprocess

import torch

from ..engine.precision import cpu_has_native_bf16


def machine_description(device):
    """{"cpu", "cpu_cores", "native_bf16" (ddetr.engine.precision's verdict),
    "torch_threads", "torch", "python", "platform"} and, for device "cuda", {"gpu", "gpu_memory_gib", "cuda"} of the current device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")]
        if models:
            cpu = models[0]
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_cores=os.cpu_count(), native_bf16=cpu_has_native_bf16(),
                torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform())
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def git_commit():
    """(commit hash, whether tracked files have uncommitted changes) of the current
    directory's git checkout; (None, False) outside one or without git."""
    commit = _git("rev-parse", "HEAD")
    return commit, bool(commit and _git("status", "--porcelain", "--untracked-files=no"))


def load_average():
    """[1, 5, 15 min] load averages rounded to 0.01, or None where the OS has none."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(command, device):
    """The fields a recorded result starts with: the command, the commit and whether
    tracked files had uncommitted changes, the machine, its load average now."""
    commit, dirty = git_commit()
    return {"command": command, "commit": commit, "uncommitted_changes": dirty,
            "machine": machine_description(device), "load_average_at_start": load_average()}
