"""Read the benchmark results that ``python -m ddetr bench kernels`` records."""
import json
from pathlib import Path


def load_kernel_benchmarks(folder):
    """{device: result} for every ``kernels_<device>.json`` in ``folder``, e.g.
    {"cpu": {...}, "cuda": {...}}. The book passes ``"../benchmarks"``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no benchmark folder at {folder} (the kernels_<device>.json "
                                f"of python -m ddetr bench kernels)")
    results = {}
    for path in sorted(folder.glob("kernels_*.json")):
        results[path.stem.split("_", 1)[1]] = json.loads(path.read_text())
    return results


def machine_name(result):
    """A one-line description of the machine a benchmark result was recorded on."""
    m = result.get("machine", {})
    if result.get("device") == "cuda" or m.get("gpu"):
        parts = [m.get("gpu"), f"CUDA {m['cuda']}" if m.get("cuda") else None,
                 f"torch {m['torch']}" if m.get("torch") else None]
    else:
        parts = [m.get("cpu"), f"{m['cpu_cores']} cores" if m.get("cpu_cores") else None,
                 f"{m['torch_threads']} torch threads" if m.get("torch_threads") else None,
                 f"torch {m['torch']}" if m.get("torch") else None]
    return ", ".join(p for p in parts if p)
