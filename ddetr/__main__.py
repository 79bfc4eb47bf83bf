"""The command line: python -m ddetr train | evaluate | demo | bench | experiment ...

train, evaluate and demo are defined in ``ddetr.engine.cli``; bench and experiment
below, each calling one function of ``ddetr.experiments``.
"""
import argparse
import os
import sys
from pathlib import Path

from .engine import cli
from .experiments.convergence import RUNS, run_convergence
from .experiments.kernel_inputs import SHAPES
from .experiments.kernels import bench_kernels, build_kernel


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m ddetr",
                                     description="Deformable DETR: train, evaluate, "
                                                 "demo and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub)    # train, evaluate, demo

    bench = sub.add_parser("bench", help="build the fused operator, run benchmarks")
    targets = bench.add_subparsers(dest="target", required=True)
    build = targets.add_parser("build", help="compile (or find cached) the fused kernel")
    build.add_argument("--cuda", action="store_true",
                       help="build the CUDA part even without a GPU (needs nvcc)")
    build.add_argument("--verbose", action="store_true", help="show compiler output")
    build.set_defaults(func=run_bench_build)
    kernels = targets.add_parser("kernels", help="reference vs fused ms_deform_attn")
    kernels.add_argument("--device", choices=("cpu", "cuda"), default=None,
                         help="default: cuda if available, else cpu")
    kernels.add_argument("--shapes", default=",".join(SHAPES),
                         help=f"comma-separated subset of {','.join(SHAPES)}")
    kernels.add_argument("--repeat", type=int, default=5, help="timed runs per case")
    kernels.add_argument("--out", default="benchmarks", help="folder for JSON and table")
    kernels.add_argument("--no-memory", action="store_true",
                         help="skip the peak-memory measurements")
    kernels.set_defaults(func=run_bench_kernels)

    p = sub.add_parser("experiment", help="reproduce the paper's claims in miniature")
    p.add_argument("name", choices=["convergence"],
                   help="convergence: DETR vs Deformable DETR (single/multi-scale, ...)")
    p.add_argument("--quick", action="store_true",
                   default=os.environ.get("DDETR_QUICK", "") not in ("", "0"),
                   help="a few steps on a tiny set (CI); also DDETR_QUICK=1")
    p.add_argument("--out", default="benchmarks", help="results folder (default benchmarks)")
    p.add_argument("--runs-dir", default="runs/convergence",
                   help="the engine's checkpoints and logs (default runs/convergence)")
    p.add_argument("--models", nargs="+", default=None, help=f"some of {[r[0] for r in RUNS]}")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (processes)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--time-limit-min", type=float, default=None, help="wall cap per run")
    p.add_argument("--start-within-min", type=float, default=None,
                   help="start no run later than this many minutes in (the rest stay "
                        "pending)")
    p.set_defaults(func=run_experiment)
    return parser


def run_bench_build(args):
    return 0 if build_kernel(cuda=args.cuda, verbose=args.verbose) else 1


def run_bench_kernels(args):
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    try:
        bench_kernels(args.out, args.device, shapes, repeat=args.repeat,
                      memory=not args.no_memory)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"python -m ddetr bench kernels: {e}") from None
    return 0


def run_experiment(args):
    try:
        run_convergence(args.out, args.quick, args.models, args.seeds, args.steps,
                        args.eval_every, args.jobs, args.threads, args.time_limit_min,
                        args.runs_dir, command="python -m ddetr " + " ".join(sys.argv[1:]),
                        start_within_min=args.start_within_min)
    except ValueError as e:
        raise SystemExit(f"python -m ddetr experiment: {e}") from None
    print((Path(args.out) / "convergence.md").read_text())
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
