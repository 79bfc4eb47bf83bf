"""The train, evaluate and demo sub-commands of ``python -m ddetr``.

    python -m ddetr train --config cpu epochs=20 lr=1e-4
    python -m ddetr train --config runs/cpu/my.yaml --resume
    python -m ddetr evaluate --checkpoint runs/cpu/checkpoint.pth
    python -m ddetr demo --checkpoint runs/cpu/checkpoint.pth --image img.jpg --output out.png
"""
import logging


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="train a model (torchrun for several processes)")
    p.add_argument("--config", default="cpu", help="preset name or YAML file (default cpu)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config values to change, e.g. epochs=2 lr=1e-4")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue a run (default: <output_dir>/checkpoint.pth)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser("evaluate", help="COCO AP of a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config values to change, e.g. data_path=/data/coco")
    p.add_argument("--device", default="auto")
    p.add_argument("--split", default="val")
    p.set_defaults(func=run_evaluate)

    p = subparsers.add_parser("demo", help="draw a checkpoint's detections on an image")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--output", default=None, help="output image (default: <image>_det.png)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_demo)


def _setup_logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_train(args):
    from ..config import get_config
    from .distributed import cleanup, is_main_process
    from .evaluate import format_table
    from .train import train

    _setup_logging()
    try:
        cfg = get_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"python -m ddetr train: {e}") from None
    run = train(cfg, resume=args.resume, progress=not args.no_progress)
    if is_main_process():
        print(f"checkpoint: {run['checkpoint']}")
        if run["stats"]:
            print(format_table(run["stats"]))
    cleanup()
    return 0


def run_evaluate(args):
    from .evaluate import format_table
    from .predict import evaluate_checkpoint

    _setup_logging()
    try:
        stats = evaluate_checkpoint(args.checkpoint, args.device, args.overrides, args.split)
    except FileNotFoundError as e:
        raise SystemExit(f"python -m ddetr evaluate: {e}") from None
    print(format_table(stats))
    return 0


def run_demo(args):
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz.detections import draw_detections
    from .predict import load_trained, predict_image

    try:
        model, post, cfg, categories = load_trained(args.checkpoint, args.device)
        det = predict_image(model, post, cfg, args.image, args.threshold)
    except FileNotFoundError as e:
        raise SystemExit(f"python -m ddetr demo: {e}") from None
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
