"""Where a training step's time goes on a CPU: ``python -m ddetr bench profile --device cpu``.

The engine's own training step (``ddetr.engine.train.train_step``) on the preset's real
training data (its loader, with its augmentations), per precision (float32, and
bfloat16 autocast where the processor has it natively), split two ways:

* by phase, wall clock: loading and augmenting a batch (the loader), the forward by
  module (backbone, input projections, encoder, decoder, the rest: flattening,
  proposals, heads), the matcher, the rest of the loss, the optimizer's step, and the
  backward with gradient clipping (the step's remainder); plus evaluation per image;
* by operator, torch.profiler's self CPU time summed into kinds (convolution forward
  and backward, matrix products, the fused deformable-attention op forward and
  backward, batch and layer norm, copies, ...), the top operators listed too.

Module forward times come from forward hooks (``time.perf_counter``, the CPU runs
synchronously); the backward is timed as a whole because autograd runs it op by op,
which the operator split covers. Results go to ``<out>/train_profile_cpu.json`` and
``<out>/train_profile_cpu.md`` with the command, commit and processor.
"""
import collections
import json
import time
from pathlib import Path

import torch

from ..config import get_config, parse_overrides
from ..engine.evaluate import evaluate
from ..engine.precision import autocast_dtype
from ..engine.train import build_loaders, build_optimizer, seed_everything, train_step
from ..models import build_model
from .machine import load_average, provenance

# operator kind: substrings of torch.profiler keys, first match wins. The fused op's
# forward kernel runs inside the autograd wrapper that torch.library.register_autograd
# makes, whose profiler key is "GeneratedBackwardFor_ddetr_ms_deform_attn_default"
# despite its name: the forward's time is that key's self time (the key of the op,
# "ddetr::ms_deform_attn", holds only the dispatch); the backward's node is
# "..._defaultBackward", around "ddetr::ms_deform_attn_backward".
KINDS = (("fused op backward", ("ms_deform_attn_backward", "MSDeformAttnBackward",
                                "ms_deform_attn_cpu_backward",
                                "ms_deform_attn_defaultBackward")),
         ("fused op forward", ("ms_deform_attn",)),
         ("convolution backward", ("convolution_backward", "ConvolutionBackward")),
         ("convolution forward", ("conv2d", "convolution", "mkldnn_convolution")),
         ("matrix products", ("addmm", "aten::mm", "bmm", "matmul", "linear", "MmBackward",
                              "AddmmBackward", "BmmBackward")),
         ("batch norm", ("batch_norm",)), ("layer/group norm", ("layer_norm", "group_norm")),
         ("copies and casts", ("copy_", "to_copy", "contiguous", "clone", "_to_copy")),
         ("optimizer", ("Optimizer", "_fused_adamw", "adamw", "foreach")))
MODULES = ("backbone", "input_proj", "transformer.encoder", "transformer.decoder")


class PhaseClock:
    """Seconds per phase, summed: forward hooks on the model's modules, a wrapper on the
    matcher, step hooks on the optimizer."""

    def __init__(self, model, criterion, optimizer):
        self.seconds = collections.Counter()
        self.handles = []
        for name in ("model", *MODULES, "criterion"):
            module = {"model": model, "criterion": criterion}.get(name)
            module = module if module is not None else model.get_submodule(name)
            for part in (module if name == "input_proj" else [module]):
                self._time_forward(part, name)
        self._time_call(criterion.matcher, "match_all", "matcher")
        self._time_call(optimizer, "step", "optimizer")

    def _time_forward(self, module, name):
        start = {}
        self.handles.append(module.register_forward_pre_hook(
            lambda *_: start.__setitem__("t", time.perf_counter())))
        self.handles.append(module.register_forward_hook(
            lambda *_: self.seconds.update({name: time.perf_counter() - start["t"]})))

    def _time_call(self, owner, method, name):
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t
        setattr(owner, method, timed)

    def remove(self):
        for h in self.handles:
            h.remove()


def operator_kinds(events):
    """{kind: self CPU seconds} of the profiler's averaged events (KINDS, else "other")."""
    kinds = collections.Counter()
    for e in events:
        kind = next((k for k, keys in KINDS if any(s in e.key for s in keys)), "other")
        kinds[kind] += e.self_cpu_time_total / 1e6
    return kinds


def phase_split(seconds, steps):
    """Milliseconds per step of each phase; the forward's and the loss's remainders."""
    ms = {k: v / steps * 1e3 for k, v in seconds.items()}
    modules = sum(ms.get(m, 0.0) for m in MODULES)
    out = {f"forward: {m.split('.')[-1]}": ms.get(m, 0.0) for m in MODULES}
    out["forward: the rest (flatten, proposals, heads)"] = ms["model"] - modules
    out["loss: matcher"] = ms.get("matcher", 0.0)
    out["loss: the rest"] = ms["criterion"] - ms.get("matcher", 0.0)
    out["optimizer step"] = ms.get("optimizer", 0.0)
    out["backward and clipping (the rest)"] = ms["step"] - ms["model"] - ms["criterion"] \
        - ms.get("optimizer", 0.0)
    return {k: round(v, 1) for k, v in out.items()}


def profile_precision(cfg, steps, warmup):
    """One precision: phases, operator kinds and the top operators of `steps` steps of
    the real loader's batches, data loading and evaluation timed on their own."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device("cpu")
    seed_everything(cfg.seed)
    model, criterion, postprocessor = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    train_set, loader, val_set, val_loader = build_loaders(cfg)
    batches, t = [], time.perf_counter()
    for batch in loader:
        batches.append(batch)
        if len(batches) == warmup + steps:
            break
    load_ms = (time.perf_counter() - t) / len(batches) * 1e3
    model.train()
    for batch in batches[:warmup]:
        train_step(model, criterion, optimizer, batch, device, cfg)
    clock = PhaseClock(model, criterion, optimizer)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for batch in batches[warmup:]:
            train_step(model, criterion, optimizer, batch, device, cfg)
        clock.seconds["step"] = time.perf_counter() - t
    clock.remove()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    kinds = {k: round(v / total * 100, 1) for k, v in operator_kinds(events).most_common()}
    t = time.perf_counter()
    evaluate(model, postprocessor, val_loader, val_set.coco, device, progress=False,
             amp=cfg.amp)
    eval_ms = (time.perf_counter() - t) / len(val_set) * 1e3
    step_ms = clock.seconds["step"] / steps * 1e3
    return {"amp": cfg.amp, "step_ms": round(step_ms, 1),
            "images_per_s": round(cfg.batch_size / step_ms * 1e3, 2),
            "data_ms_per_batch": round(load_ms, 1),
            "eval_ms_per_image": round(eval_ms, 1),
            "phases_ms": phase_split(clock.seconds, steps), "operator_kinds_pct": kinds,
            "top_operators": events.table(sort_by="self_cpu_time_total", row_limit=20,
                                          max_name_column_width=50)}


def precision_configs(config, overrides):
    """The preset's Config on the CPU in float32 and, where this processor computes
    bfloat16 natively, with bfloat16 autocast (amp)."""
    amps = (False, True) if autocast_dtype(torch.device("cpu")) else (False,)
    return [get_config(config, {**overrides, "device": "cpu", "amp": a}) for a in amps]


def profile_train_step_cpu(out_dir="benchmarks", config="cpu", steps=8, warmup=3,
                           overrides=None, command=None):
    """Profile the preset's CPU training step in float32 and, where native, bfloat16;
    write ``train_profile_cpu.{json,md}`` and return the result."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps expects >= 1 and warmup >= 0, got steps={steps}, "
                         f"warmup={warmup}")
    overrides = parse_overrides(overrides)
    cfgs = precision_configs(config, overrides)
    result = {**provenance(command, "cpu"),
              "config": config, "overrides": overrides, "steps": steps, "warmup": warmup,
              "runs": []}
    for cfg in cfgs:
        run = profile_precision(cfg, steps, warmup)
        result["runs"].append(run)
        print(f"amp={cfg.amp}: {run['step_ms']:.0f} ms/step ({run['images_per_s']} images/s), "
              f"data {run['data_ms_per_batch']} ms/batch, eval {run['eval_ms_per_image']} "
              f"ms/image")
    result["load_average_at_end"] = load_average()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_profile_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(out, result)
    return result


def write_markdown(out, result):
    """``<out>/train_profile_cpu.md``: phases and operator kinds per precision."""
    m = result["machine"]
    lines = ["# Where the training step's time goes (CPU)", "",
             "Written by `python -m ddetr bench profile --device cpu` "
             "(ddetr/experiments/train_profile_cpu.py, which explains the method).", "",
             f"{m['cpu']}, {m['cpu_cores']} cores, native bfloat16: {m['native_bf16']}, "
             f"torch {m['torch']}, {m['torch_threads']} threads. Load average "
             f"{result['load_average_at_start']} at the start.  ",
             f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`"
             + (" (with uncommitted changes)" if result["uncommitted_changes"] else ""), "",
             f"Preset `{result['config']}` with {result['overrides'] or 'no overrides'}: "
             f"{result['warmup']} untimed and {result['steps']} profiled steps on the "
             f"training loader's batches.", ""]
    for run in result["runs"]:
        lines += [f"## {'bfloat16 autocast' if run['amp'] else 'float32'}", "",
                  f"{run['step_ms']} ms per step ({run['images_per_s']} images/s, under the "
                  f"profiler); loading a batch {run['data_ms_per_batch']} ms; evaluation "
                  f"{run['eval_ms_per_image']} ms per image.", "",
                  "| phase | ms per step | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v} | {v / run['step_ms']:.0%} |"
                  for k, v in run["phases_ms"].items()]
        lines += ["", "| operator kind (self CPU time) | share |", "|---|---:|"]
        lines += [f"| {k} | {v}% |" for k, v in run["operator_kinds_pct"].items()]
        lines += ["", "```", run["top_operators"], "```", ""]
    (out / "train_profile_cpu.md").write_text("\n".join(lines))
