"""The command line: python -m ddetr [--debug] train | evaluate | demo | export | bench |
experiment

    python -m ddetr train --config cpu epochs=20 lr=1e-4
    python -m ddetr train --config runs/cpu/my.yaml --resume epochs=30
    python -m ddetr evaluate --checkpoint runs/cpu/checkpoint.pth
    python -m ddetr evaluate --checkpoint r50_deformable_detr-checkpoint.pth --config paper
    python -m ddetr demo --checkpoint runs/cpu/checkpoint.pth --image img.jpg --output out.png
    python -m ddetr export --checkpoint runs/cpu/checkpoint.pth --format onnx --out model.onnx
    python -m ddetr export --checkpoint runs/paper/checkpoint.pth --format huggingface --out hf/
    python -m ddetr evaluate --checkpoint hf_folder/ data_path=/data/coco
    python -m ddetr bench kernels --device cpu
    python -m ddetr bench train --device cuda --config paper --size 800x1066
    python -m ddetr bench contention
    python -m ddetr bench onnx --threads 2
    python -m ddetr experiment convergence --quick
    python -m ddetr experiment record runs/cpu --name "seed 0" --command "..." --reference

Config overrides (``key=value``) may stand anywhere after the verb, also right after
``--resume``. A mistake in the config, the data, a checkpoint or the device is printed
as one line on stderr, with exit status 2; ``--debug`` (before or after the verb) shows
the traceback instead. The whole config is checked before any data is generated or any
step trained (``ddetr.config``). Ctrl-C is one line too (training: where it stopped and
which checkpoint is kept), with exit status 130.
"""
import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from .analysis.kernel_cost import kernel_cost_report
from .config import get_config
from .engine.distributed import cleanup, is_main_process
from .engine.evaluate import format_table
from .engine.predict import evaluate_checkpoint, load_trained, predict_image
from .engine.train import resolve_device, train
from .experiments.convergence import RUNS, run_convergence
from .experiments.kernel_inputs import SHAPES
from .experiments.kernels import bench_kernels, build_kernel
from .experiments.train_record import SECTIONS, record_run

VERBS_WITH_OVERRIDES = ("train", "evaluate", "demo", "export")
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")   # key=value, key a config name


def _overrides_arg(p, example):
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"config values to change, anywhere on the line, e.g. {example}")


def build_parser():
    """The command line: one sub-command per verb (and per bench target)."""
    parser = argparse.ArgumentParser(prog="python -m ddetr",
                                     description="Deformable DETR: train, evaluate, "
                                                 "demo and benchmarks")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also after the verb)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_evaluate, _add_demo, _add_export, _add_bench,
                _add_experiment):
        add(sub)
    return parser


def _add_train(sub):
    """python -m ddetr train"""
    p = sub.add_parser("train", help="train a model (torchrun for several processes)")
    p.add_argument("--config", default="cpu", help="preset name or YAML file (default cpu)")
    _overrides_arg(p, "epochs=2 lr=1e-4")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue a run (default: <output_dir>/checkpoint.pth)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def _add_evaluate(sub):
    """python -m ddetr evaluate"""
    p = sub.add_parser("evaluate", help="COCO AP of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", default=None, metavar="PRESET_OR_YAML",
                   help="the config of a checkpoint that carries none (official releases)")
    _overrides_arg(p, "data_path=/data/coco")
    p.add_argument("--device", default="auto")
    p.add_argument("--split", default="val")
    p.set_defaults(func=run_evaluate)


def _add_demo(sub):
    """python -m ddetr demo"""
    p = sub.add_parser("demo", help="draw a checkpoint's detections on an image")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", default=None, metavar="PRESET_OR_YAML",
                   help="the config of a checkpoint that carries none (official releases)")
    p.add_argument("--image", required=True)
    p.add_argument("--output", default=None, help="output image (default: <image>_det.png)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    _overrides_arg(p, "num_queries=100")
    p.set_defaults(func=run_demo)


def _add_export(sub):
    """python -m ddetr export"""
    p = sub.add_parser("export", help="write a checkpoint as ONNX (checked with ONNX "
                                      "Runtime) or as a Hugging Face folder")
    p.add_argument("--checkpoint", required=True,
                   help="a ddetr checkpoint, an official release or a Hugging Face folder")
    p.add_argument("--config", default=None, metavar="PRESET_OR_YAML",
                   help="the config of a checkpoint that carries none (official releases)")
    p.add_argument("--format", choices=("onnx", "huggingface"), default="onnx")
    p.add_argument("--out", required=True,
                   help="the .onnx file, or the new folder for --format huggingface")
    p.add_argument("--size", default=None, metavar="HxW",
                   help="ONNX: image size to trace and check at (default: the config's "
                        "val_scale, 4:3, e.g. 800x1066); the graph takes any size")
    p.add_argument("--image", nargs="+", default=None,
                   help="ONNX: images to check the graph on (default: synthetic scenes)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime threads for the check (default: all)")
    _overrides_arg(p, "data_path=/data/coco")
    p.set_defaults(func=run_export)


def _add_bench(sub):
    """python -m ddetr bench TARGET"""
    p = sub.add_parser("bench", help="build the fused operator, run benchmarks")
    targets = p.add_subparsers(dest="target", required=True)
    for add in (_add_bench_build, _add_bench_kernels, _add_bench_cost, _add_bench_contention,
                _add_bench_onnx, _add_bench_train, _add_bench_profile, _add_bench_speedup,
                _add_bench_compile):
        add(targets)


def _add_bench_build(targets):
    """bench build"""
    build = targets.add_parser("build", help="compile (or find cached) the fused kernel")
    build.add_argument("--cuda", action="store_true",
                       help="build the CUDA part even without a GPU (needs nvcc)")
    build.add_argument("--verbose", action="store_true", help="show compiler output")
    build.set_defaults(func=run_bench_build)


def _add_bench_kernels(targets):
    """bench kernels"""
    kernels = targets.add_parser("kernels", help="reference vs fused ms_deform_attn")
    kernels.add_argument("--device", choices=("cpu", "cuda"), default=None,
                         help="default: cuda if available, else cpu")
    kernels.add_argument("--shapes", default=",".join(SHAPES),
                         help=f"comma-separated subset of {','.join(SHAPES)}")
    kernels.add_argument("--repeat", type=int, default=5, help="timed runs per case")
    kernels.add_argument("--out", default="benchmarks", help="folder for JSON and table")
    kernels.add_argument("--no-memory", action="store_true",
                         help="skip the peak-memory measurements")
    kernels.add_argument("--dtypes", default=None,
                         help="comma-separated value types, float32 first (default: float32 "
                              "on a CPU, float32,bfloat16 on a GPU)")
    kernels.add_argument("--official", default=None, metavar="CHECKOUT",
                         help="a Deformable-DETR checkout: build its CUDA op at run time and "
                              "time it beside ddetr's (GPU, float32)")
    kernels.set_defaults(func=run_bench_kernels)


def _add_bench_cost(targets):
    """bench cost"""
    cost = targets.add_parser("cost", help="static cost of the CUDA kernels (no GPU needed): "
                                           "registers, spills, SASS instructions per point")
    cost.add_argument("--out", default="benchmarks", help="folder for kernel_cost.json/.md")
    cost.add_argument("--baseline", default=None, metavar="FOLDER",
                      help="a folder with an earlier ms_deform_attn_cuda.cu (and its header) "
                           "to measure the same way, as the baseline")
    cost.set_defaults(func=run_bench_cost)


def _add_bench_contention(targets):
    """bench contention"""
    cont = targets.add_parser("contention", help="training images/s on a shared CPU: alone, "
                                                 "next to busy processes, per thread setting")
    cont.add_argument("--out", default="benchmarks", help="folder for contention.json/.md")
    cont.add_argument("--iters", type=int, default=40, help="timed iterations per setting")
    cont.set_defaults(func=run_bench_contention)


def _add_bench_onnx(targets):
    """bench onnx"""
    onnx = targets.add_parser("onnx", help="ONNX Runtime against PyTorch (reference and "
                                           "fused attention) on the CPU")
    onnx.add_argument("--cases", default="cpu:256x256,cpu:800x1066,paper:800x1066",
                      help="comma-separated PRESET:HxW (one export per preset)")
    onnx.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    onnx.add_argument("--repeat", type=int, default=5, help="timed runs per case")
    onnx.add_argument("--out", default="benchmarks", help="folder for onnx_cpu.json, onnx.md")
    onnx.set_defaults(func=run_bench_onnx)


def _add_bench_train(targets):
    """bench train"""
    step = targets.add_parser("train", help="images/s and peak memory of the training "
                                            "step, per attention backend and amp setting")
    step.add_argument("--config", default="paper", help="preset or YAML file (default paper)")
    step.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="default: cuda if available, else cpu")
    step.add_argument("--batch-size", default="2",
                      help="images per step, or several comma-separated (default 2)")
    step.add_argument("--size", default="800x1066", help="image HEIGHTxWIDTH (default 800x1066)")
    step.add_argument("--backends", default=None,
                      help="comma-separated attention backends: reference, kernel, triton "
                           "(default: kernel,triton on a GPU, reference,kernel on a CPU)")
    step.add_argument("--amp", default="off,on", help="mixed precision settings: off, on")
    step.add_argument("--iters", type=int, default=10, help="timed steps per setting")
    step.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    step.add_argument("--out", default="benchmarks", help="folder for train_step*.json/.md")
    _overrides_arg(step, "backbone_norm=batch_norm")
    step.set_defaults(func=run_bench_train)


def _add_bench_profile(targets):
    """bench profile"""
    prof = targets.add_parser("profile", help="where a training step's time goes: on a GPU "
                              "host syncs, GPU busy fraction, top kernels; on a CPU phases "
                              "and operator kinds on the preset's own data")
    prof.add_argument("--device", choices=["cpu", "cuda"], default=None,
                      help="default: cuda if available, else cpu")
    prof.add_argument("--config", default=None,
                      help="preset or YAML file (default: paper on cuda, cpu on cpu)")
    prof.add_argument("--batch-size", type=int, default=2,
                      help="GPU: images per step (default 2); CPU: the preset's")
    prof.add_argument("--size", default="800x1066",
                      help="GPU: image HEIGHTxWIDTH (default 800x1066); CPU: the loader's")
    prof.add_argument("--steps", type=int, default=None,
                      help="profiled steps (default 3 on cuda, 8 on cpu)")
    prof.add_argument("--out", default="benchmarks",
                      help="folder for train_profile_<device>.*")
    _overrides_arg(prof, "backbone_norm=batch_norm")
    prof.set_defaults(func=run_bench_profile)


def _add_bench_speedup(targets):
    """bench speedup"""
    ab = targets.add_parser("speedup", help="the CPU training step now against the step "
                                            "before issue 32's changes, side by side")
    ab.add_argument("--config", default="cpu", help="preset or YAML file (default cpu)")
    ab.add_argument("--size", default="256x256", help="image HEIGHTxWIDTH (default 256x256)")
    ab.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ab.add_argument("--steps", type=int, default=3, help="steps per round (default 3)")
    ab.add_argument("--out", default="benchmarks", help="folder for step_speedup.json")
    _overrides_arg(ab, "batch_size=2")
    ab.set_defaults(func=run_bench_speedup)


def _add_bench_compile(targets):
    """bench compile"""
    comp = targets.add_parser("compile", help="torch.compile against the eager CPU training "
                                              "step: compile time and what a budget trains")
    comp.add_argument("--config", default="cpu", help="preset or YAML file (default cpu)")
    comp.add_argument("--batches", type=int, default=12,
                      help="batches of the preset's loader, each way (default 12)")
    comp.add_argument("--budget-min", type=float, default=15.0,
                      help="the time budget the images are counted in (default 15)")
    comp.add_argument("--out", default="benchmarks", help="folder for compile_cost.json")
    _overrides_arg(comp, "batch_size=2")
    comp.set_defaults(func=run_bench_compile)


def _add_experiment(sub):
    """python -m ddetr experiment NAME"""
    p = sub.add_parser("experiment", help="reproduce the paper's claims in miniature; "
                                          "record a training run")
    names = p.add_subparsers(dest="experiment", required=True)
    for add in (_add_experiment_convergence, _add_experiment_record):
        add(names)


def _add_experiment_convergence(names):
    """experiment convergence"""
    p = names.add_parser("convergence",
                         help="DETR vs Deformable DETR (single/multi-scale, ...)")
    p.add_argument("--quick", action="store_true",
                   default=os.environ.get("DDETR_QUICK", "") not in ("", "0"),
                   help="a few steps on a tiny set (CI); also DDETR_QUICK=1")
    p.add_argument("--out", default="benchmarks", help="results folder (default benchmarks)")
    p.add_argument("--runs-dir", default="runs/convergence",
                   help="the engine's checkpoints and logs (default runs/convergence)")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"some of {[r[0] for r in RUNS]}")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    p.add_argument("--lr-drop", type=int, default=None,
                   help="the step after which the rate is 10x lower (default: 7/8 of the "
                        "steps, rounded to whole evaluations)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the runs train (cuda: all of them share the GPU)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--time-limit-min", type=float, default=None, help="wall cap per run")
    p.add_argument("--start-within-min", type=float, default=None,
                   help="start no run later than this many minutes in (the rest stay "
                        "pending)")
    p.set_defaults(func=run_experiment)


def _add_experiment_record(names):
    """experiment record"""
    p = names.add_parser("record", help="add a finished cpu-preset run to "
                                        "benchmarks/train_cpu.json (and its table)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder (its checkpoint.pth)")
    p.add_argument("--name", required=True, help="the record's name (replaces a namesake)")
    p.add_argument("--command", required=True, dest="run_command",   # not the verb's
                   help="the command that trained the run")
    p.add_argument("--note", default="", help="a remark kept with the record")
    p.add_argument("--section", default="budget_runs", choices=SECTIONS,
                   help="budget_runs (default) or recipe_runs (recipes at a fixed number "
                        "of images)")
    p.add_argument("--recipe", default="preset", help="what the run changed, in short")
    p.add_argument("--reference", action="store_true",
                   help="also store its weights: the reference of its kind of processor")
    p.add_argument("--commit", default=None, help="the commit the run trained at "
                                                  "(default: the checkout's)")
    p.add_argument("--out", default="benchmarks", help="folder of train_cpu.json/.md")
    p.set_defaults(func=run_experiment_record)


def parse_args(argv):
    """argparse, with the config overrides taken out first: a ``key=value`` word after
    a verb that has overrides is one wherever it stands (``--resume epochs=3`` resumes
    the default checkpoint with epochs=3)."""
    argv = [a for a in argv if a != "--debug"]
    verb = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    overrides = []
    if verb < len(argv) and argv[verb] in VERBS_WITH_OVERRIDES:
        rest = argv[verb + 1:]
        overrides = [a for a in rest if OVERRIDE.match(a)]
        argv = argv[:verb + 1] + [a for a in rest if not OVERRIDE.match(a)]
    args = build_parser().parse_args(argv)
    if hasattr(args, "overrides"):          # what argparse got there is no key=value:
        args.overrides = overrides + args.overrides     # get_config names it
    return args


# --- errors ------------------------------------------------------------------------
# What the library raises for a mistake in the config, the data, a checkpoint or the
# device (ValueError, TypeError; FileNotFoundError and the other OSErrors; RuntimeError:
# an unreadable checkpoint, CheckpointMismatchError, a kernel that cannot be built;
# FloatingPointError: a diverging run; ImportError: an optional package that is missing):
# reported in one line. Anything else keeps its traceback.
LIBRARY_ERRORS = (ValueError, TypeError, OSError, RuntimeError, FloatingPointError,
                  ImportError)


def one_line(error):
    """The message of an error on one line (a DataLoader worker's error: its last line,
    the original message, without the worker's traceback)."""
    text = str(error).strip() or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Original Traceback" in text:
        lines = lines[-1:]
    return " ".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = parse_args(argv)
    try:
        return args.func(args)
    except LIBRARY_ERRORS as e:
        if debug:
            raise
        print(f"python -m ddetr {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:      # Ctrl-C: where it stopped (train says), status 130
        if debug:
            raise
        print(f"python -m ddetr {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130


# --- the verbs ---------------------------------------------------------------------
def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_train(args):
    _setup_logging()
    cfg = get_config(args.config, args.overrides)   # checked whole, before any work
    resolve_device(cfg.device)                      # a device this machine has
    run = train(cfg, resume=args.resume, progress=not args.no_progress)
    if is_main_process():
        print(f"checkpoint: {run['checkpoint']}")
        if run["stats"]:
            print(format_table(run["stats"]))
    cleanup()
    return 0


def run_evaluate(args):
    _setup_logging()
    resolve_device(args.device)
    stats = evaluate_checkpoint(args.checkpoint, args.device, args.overrides, args.split,
                                config=args.config)
    print(format_table(stats))
    return 0


def run_demo(args):
    import matplotlib                     # the file backend, chosen before pyplot loads
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .viz.detections import draw_detections     # pyplot: only for this verb

    resolve_device(args.device)
    model, post, cfg, categories = load_trained(args.checkpoint, args.device,
                                                args.overrides, config=args.config)
    det = predict_image(model, post, cfg, args.image, args.threshold)
    ax = draw_detections(det["image"], det["boxes"], det["labels"], det["scores"],
                         categories, title=f"{len(det['boxes'])} detections >= "
                                           f"{args.threshold}")
    out = Path(args.output or Path(args.image).with_name(Path(args.image).stem + "_det.png"))
    ax.figure.savefig(out, dpi=150, bbox_inches="tight")
    plt.close(ax.figure)
    for box, label, score in zip(det["boxes"].tolist(), det["labels"].tolist(),
                                 det["scores"].tolist()):
        name = categories.get(label, str(label))
        print(f"{name:>10} {score:.2f} [{', '.join(f'{v:.1f}' for v in box)}]")
    print(f"wrote {out}")
    return 0


def parse_size(text, option="--size"):
    """'800x1066' -> (800, 1066)."""
    size = re.fullmatch(r"(\d+)x(\d+)", text or "")
    if not size or min(int(size[1]), int(size[2])) < 1:
        raise ValueError(f"{option} expects HEIGHTxWIDTH, e.g. 800x1066, got {text!r}")
    return int(size[1]), int(size[2])


def run_export(args):
    from .engine.export_onnx import export_onnx
    from .engine.huggingface import save_huggingface
    if args.format == "huggingface" and (args.size or args.image or args.threads):
        raise ValueError("--size, --image and --threads apply to --format onnx only")
    size = parse_size(args.size) if args.size else None
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads expects >= 1, got {args.threads}")
    model, post, cfg, categories = load_trained(args.checkpoint, "cpu", args.overrides,
                                                config=args.config)
    if args.format == "huggingface":
        save_huggingface(model, cfg, categories, args.out)
        print(f"wrote {args.out} (config.json, model.safetensors): "
              f"DeformableDetrForObjectDetection.from_pretrained({str(args.out)!r})")
        return 0
    report = export_onnx(model, post, cfg, args.out, size, args.image, args.threads,
                         categories)
    for check in report["checks"]:
        N, H, W = check["shape"]
        print(f"ONNX Runtime vs PyTorch, {N} image(s) at {H}x{W}: scores within "
              f"{check['score']:.1e}, boxes within {check['box']:.1e} of the image side, "
              f"labels equal")
    print(f"wrote {report['path']} (opset {report['opset']}; any batch size, images of at "
          f"least {report['min_side']} pixels a side)")
    return 0


def run_bench_onnx(args):
    from .experiments.onnx_runtime import bench_onnx
    cases = []
    for item in (c.strip() for c in args.cases.split(",") if c.strip()):
        preset, _, size = item.partition(":")
        cases.append((preset, parse_size(size, "--cases")))
    if not cases or min(args.threads, args.repeat) < 1:
        raise ValueError(f"--cases expects PRESET:HxW items, --threads and --repeat >= 1; "
                         f"got {args.cases!r}, {args.threads}, {args.repeat}")
    bench_onnx(args.out, cases, args.threads, args.repeat,
               command="python -m ddetr " + " ".join(sys.argv[1:]))
    print((Path(args.out) / "onnx.md").read_text())
    return 0


def run_bench_build(args):
    return 0 if build_kernel(cuda=args.cuda, verbose=args.verbose) else 1


def run_bench_kernels(args):
    if args.repeat < 1:
        raise ValueError(f"--repeat expects >= 1 (timed runs per case), got {args.repeat}")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] if args.dtypes else None
    bench_kernels(args.out, args.device, shapes, repeat=args.repeat,
                  memory=not args.no_memory, dtypes=dtypes, official=args.official)
    return 0


def run_bench_cost(args):
    kernel_cost_report(args.out, baseline_dir=args.baseline)
    print((Path(args.out) / "kernel_cost.md").read_text())
    return 0


def run_bench_profile(args):
    import torch
    command = "python -m ddetr " + " ".join(sys.argv[1:])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps expects >= 1, got {args.steps}")
    if device == "cpu":
        from .experiments.train_profile_cpu import profile_train_step_cpu
        profile_train_step_cpu(args.out, args.config or "cpu", args.steps or 8,
                               overrides=args.overrides, command=command)
        return 0
    from .experiments.train_profile import profile_train_step
    size = parse_size(args.size)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size expects >= 1, got {args.batch_size}")
    profile_train_step(args.out, args.config or "paper", args.batch_size, size,
                       steps=args.steps or 3, overrides=args.overrides, command=command)
    return 0


def run_bench_speedup(args):
    from .experiments.step_speedup import bench_step_speedup
    bench_step_speedup(args.out, args.config, parse_size(args.size), args.rounds, args.steps,
                       overrides=args.overrides,
                       command="python -m ddetr " + " ".join(sys.argv[1:]))
    return 0


def run_bench_compile(args):
    from .experiments.compile_cost import bench_compile
    bench_compile(args.out, args.config, args.batches, args.budget_min,
                  overrides=args.overrides,
                  command="python -m ddetr " + " ".join(sys.argv[1:]))
    return 0


def run_bench_contention(args):
    from .experiments.contention import bench_contention
    if args.iters < 1:
        raise ValueError(f"--iters expects >= 1, got {args.iters}")
    bench_contention(args.out, args.iters)


def run_bench_train(args):
    from .experiments.train_step import bench_train_step
    size = parse_size(args.size)
    switch = {"off": False, "on": True}
    amp = [a.strip() for a in args.amp.split(",") if a.strip()]
    if not amp or any(a not in switch for a in amp):
        raise ValueError(f"--amp expects off and/or on, comma-separated, got {args.amp!r}")
    if not re.fullmatch(r"\d+(,\d+)*", args.batch_size):
        raise ValueError(f"--batch-size expects a number or numbers separated by commas, "
                         f"got {args.batch_size!r}")
    bench_train_step(args.out, args.config, args.device,
                     [int(n) for n in args.batch_size.split(",")], size,
                     [b.strip() for b in (args.backends or "").split(",") if b.strip()],
                     [switch[a] for a in amp], args.iters, args.warmup, args.overrides,
                     command="python -m ddetr " + " ".join(sys.argv[1:]))
    print((Path(args.out) / "train_step.md").read_text())
    return 0


def run_experiment(args):
    run_convergence(args.out, args.quick, args.models, args.seeds, args.steps,
                    args.eval_every, args.jobs, args.threads, args.time_limit_min,
                    args.runs_dir, command="python -m ddetr " + " ".join(sys.argv[1:]),
                    start_within_min=args.start_within_min, lr_drop=args.lr_drop,
                    device=args.device)
    print((Path(args.out) / "convergence.md").read_text())
    return 0


def run_experiment_record(args):
    record = record_run(args.run_dir, args.name, args.run_command, args.note, args.out,
                        args.reference, args.commit, args.section, args.recipe)
    print(json.dumps({k: record[k] for k in ("name", "epochs", "images_per_s",
                                            "lr_drop_epoch", "coco")}))
    return 0
