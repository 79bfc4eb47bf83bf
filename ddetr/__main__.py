"""The command line: python -m ddetr train | evaluate | demo | bench ...

Each sub-command lives next to the code it runs; its module adds its own parser.
"""
import argparse
import sys


def build_parser():
    from . import bench, experiment
    from .engine import cli

    parser = argparse.ArgumentParser(prog="python -m ddetr",
                                     description="Deformable DETR: train, evaluate, "
                                                 "demo and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub)    # train, evaluate, demo
    bench.add_parser(sub)  # bench
    experiment.add_parser(sub)  # experiment convergence
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
