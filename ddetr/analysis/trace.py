"""Shape traces: which module produced which tensor shapes during one forward pass."""
import torch


def _shapes(x):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (list, tuple)):
        return type(x)(_shapes(v) for v in x)
    if isinstance(x, dict):
        return {k: _shapes(v) for k, v in x.items()}
    return type(x).__name__ if x is not None else None


def trace_shapes(model, names, *args, **kwargs):
    """Run ``model(*args, **kwargs)`` and record the output shapes of the submodules
    called ``names`` (as in ``model.named_modules()``), in the order they ran.

    Returns (list of (name, output shapes), the model's output). A module that runs
    several times (a shared head) appears once per call.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no submodule named {missing}; e.g. {list(modules)[1:6]}")
    trace, handles = [], []
    for name in names:
        handles.append(modules[name].register_forward_hook(
            lambda module, inputs, output, name=name: trace.append((name, _shapes(output)))))
    try:
        out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return trace, out
