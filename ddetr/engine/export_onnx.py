"""Export a trained detector to ONNX, checked with ONNX Runtime before the file is written.

The graph is the whole detector with its pre- and postprocessing:

    images (N, 3, H, W) float32 RGB in [0, 1]   (resized, not normalised)
    sizes  (N, 2) int64 (h, w) of the original images
      -> scores (N, k) float32, labels (N, k) int64, boxes (N, k, 4) float32
         (x0, y0, x1, y1) in pixels of the original images, best score first

N, H and W are dynamic: one file takes any batch size and any image size whose sides
exceed the coarsest level's stride (``min_side``), as the tests check on two sizes.
A smaller image is refused in one line by ``run_onnx`` (ONNX Runtime itself would fail
deep inside a Reshape).

How. PyTorch's own exporter (``torch.onnx.export(dynamo=True)``: torch.export, then
onnxscript) traces the model with its attention on the pure PyTorch reference backend,
so that multi-scale deformable attention becomes standard ONNX operators: the
reference's ``grid_sample`` is ONNX ``GridSample`` (opset 16 and later; bilinear,
zero padding, ``align_corners=0``, the library's pixel-centre convention), and the
weighted sum of the samples is Mul and ReduceSum. The fused C++/CUDA op would need a
custom ONNX operator that no runtime has; a custom-op function with a standard body
would inline to the same GridSample graph. So any ONNX runtime runs the file, at the
price of the reference's memory traffic (the benchmark in benchmarks/onnx.md says what
that costs on a CPU).

Checked, not assumed: ``export_onnx`` writes the graph to a temporary file, runs it
with ONNX Runtime on the CPU on the check images (at the export size and, for the
dynamic axes, a second batch of two images at another size) and compares its
detections with the PyTorch model's as the user runs it (the configured attention
backend: on a CPU the fused kernel). Only a graph that agrees within TOLERANCE is
moved to ``out``; otherwise the temporary file is deleted and ExportMismatchError says
by how much it disagreed.
"""
import contextlib
import json
import logging
import math
import os
import secrets
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data.synthetic import draw_image
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..nn.ms_deform_attn import MSDeformAttn
from .predict import read_image

OPSET = 20          # GridSample with mode "linear" (opset 20); ONNX Runtime >= 1.17
PRODUCER = "ddetr"  # the graph's producer_name: a file ddetr wrote (and may overwrite)
INPUTS, OUTPUTS = ("images", "sizes"), ("scores", "labels", "boxes")

# How far ONNX Runtime may be from PyTorch. Both compute in float32 (machine epsilon
# 1.2e-7) with other kernels: other summation orders in convolutions and matrix
# products, a fused LayerNorm, other sin/exp/sigmoid approximations, and PyTorch's side
# runs the fused attention kernel, not the graph's GridSample. Each operator then
# differs by a few units in the last place, and the ~100 operators in a row amplify
# that: measured up to 5e-6 in a score (the trained cpu reference model, whose logits
# are sharper than random weights') and 4e-7 of the image side in a box corner
# (benchmarks/onnx.md). The tolerance is 20x above that and far below what a user
# could see: 1e-4 in a score (scores print to 2 decimals; a swap of two detections
# this close in score cannot change COCO AP measurably) and 1e-4 of the image side in
# a box corner (0.1 pixel at 1066).
TOLERANCE = {"score": 1e-4, "box": 1e-4}


class ExportMismatchError(ValueError):
    """ONNX Runtime's detections differ from PyTorch's: the graph was not written."""


class Detector(nn.Module):
    """The model, its input normalisation and its postprocessing as one module with
    tensor inputs and outputs (the graph that is exported); see the module docstring."""

    def __init__(self, model, postprocessor):
        super().__init__()
        self.model, self.postprocessor = model, postprocessor
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images, sizes):
        masks = torch.zeros_like(images[:, 0], dtype=torch.bool)   # whole images
        out = self.model((images - self.mean) / self.std, masks)
        return self.postprocessor.detections(out["pred_logits"], out["pred_boxes"], sizes)


def level_strides(model):
    """The stride of each of the model's L levels (e.g. 8, 16, 32, 64)."""
    strides = list(model.backbone.strides)
    strides = strides if model.num_feature_levels > 1 else strides[-1:]
    while len(strides) < model.num_feature_levels:
        strides.append(strides[-1] * 2)
    return strides


def min_side(model):
    """The smallest image side the graph takes: the coarsest level's map must have at
    least 2 pixels (the exporter fixes a size of 1), and a two-stage model must have at
    least num_queries tokens to pick its proposals from."""
    strides = level_strides(model)
    side = strides[-1] + 1
    while model.two_stage and sum(math.ceil(side / s) ** 2 for s in strides) < model.num_queries:
        side += 1
    return side


def default_size(cfg):
    """(H, W) the export is traced and checked at: the evaluation scale, 4:3 landscape
    within max_size (800x1066 for the paper presets, 256x256 for the cpu preset)."""
    return cfg.val_scale, min(cfg.max_size, round(cfg.val_scale * 4 / 3))


@contextlib.contextmanager
def attention_backend(model, backend):
    """Run every MSDeformAttn of model on ``backend`` inside the block."""
    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    saved = [m.backend for m in modules]
    try:
        for m in modules:
            m.backend = backend
        yield model
    finally:
        for m, b in zip(modules, saved):
            m.backend = b


# --- inputs -----------------------------------------------------------------------------
def image_batch(images, size):
    """PIL images -> (images (N, 3, H, W) float32 in [0, 1] resized to size (H, W)
    bilinearly, sizes (N, 2) int64 of the originals): the graph's inputs, as numpy."""
    H, W = size
    arrays = [np.asarray(img.convert("RGB").resize((W, H), Image.BILINEAR), np.float32)
              for img in images]
    batch = np.stack(arrays).transpose(0, 3, 1, 2) / 255.0
    sizes = np.array([[img.height, img.width] for img in images], np.int64)
    return np.ascontiguousarray(batch, np.float32), sizes


def check_images(paths=None, size=(256, 256), count=1, seed=0):
    """PIL images to check an export on: the files at ``paths``, else ``count``
    synthetic scenes (ddetr.data.synthetic) drawn at the larger side of ``size``."""
    if paths:
        return [read_image(path) for path in paths]
    rng = np.random.default_rng(seed)
    return [draw_image(rng, size=max(size))[0] for _ in range(count)]


# --- running and comparing ----------------------------------------------------------------
def onnx_session(path, threads=None):
    """An ONNX Runtime session on the CPU (``threads``: intra-op threads, default all)."""
    import onnxruntime as ort      # imported on use: only exporting needs it
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, images, sizes):
    """The graph's (scores, labels, boxes) as numpy; an input it cannot take is one
    ValueError naming its shape."""
    smallest = int(session.get_modelmeta().custom_metadata_map.get("min_side", 1))
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.float32:
        raise ValueError(f"images must be float32 (N, 3, H, W) in [0, 1], got "
                         f"{images.dtype} {images.shape}")
    if min(images.shape[2:]) < smallest:
        raise ValueError(f"images must be at least {smallest} pixels on each side for this "
                         f"graph (the smallest size it was exported for), got "
                         f"{images.shape[2]}x{images.shape[3]}")
    if sizes.shape != (images.shape[0], 2):
        raise ValueError(f"sizes must be (N, 2) = ({images.shape[0]}, 2), got {sizes.shape}")
    return tuple(session.run(list(OUTPUTS), {"images": images, "sizes": sizes}))


@torch.no_grad()
def run_torch(detector, images, sizes):
    """The PyTorch detector's (scores, labels, boxes) on the same numpy inputs."""
    out = detector(torch.from_numpy(images), torch.from_numpy(sizes))
    return tuple(t.numpy() for t in out)


def compare(reference, got, image_side, tolerance=TOLERANCE):
    """How far ONNX Runtime's detections are from PyTorch's.

    Sorted scores are compared rank by rank. Labels and boxes are compared by matching,
    since two detections whose scores tie within rounding may come out in either order:
    each PyTorch detection is paired with the unpaired ONNX Runtime detection of the
    same label that is closest to it (score and box, each relative to its tolerance).

    Returns dict: score (largest score difference), box (largest box-corner difference
    of a pair, as a fraction of image_side) and unmatched (PyTorch detections left
    without a partner of their label)."""
    scores, labels, boxes = reference
    o_scores, o_labels, o_boxes = got
    worst = {"score": float(np.abs(scores - o_scores).max(initial=0.0)), "box": 0.0,
             "unmatched": 0}
    for n in range(scores.shape[0]):
        free = np.ones(o_scores.shape[1], bool)
        for i in range(scores.shape[1]):
            candidates = free & (o_labels[n] == labels[n, i])
            if not candidates.any():
                worst["unmatched"] += 1
                continue
            box = np.abs(o_boxes[n] - boxes[n, i]).max(1) / image_side
            score = np.abs(o_scores[n] - scores[n, i])
            cost = np.maximum(score / tolerance["score"], box / tolerance["box"])
            j = int(np.argmin(np.where(candidates, cost, np.inf)))
            free[j] = False
            worst["score"] = max(worst["score"], float(score[j]))
            worst["box"] = max(worst["box"], float(box[j]))
    return worst


def agrees(diff, tolerance=TOLERANCE):
    """Whether a ``compare`` result is within the tolerance."""
    return (diff["score"] <= tolerance["score"] and diff["box"] <= tolerance["box"]
            and diff["unmatched"] == 0)


# --- the export ---------------------------------------------------------------------------
def export_onnx(model, postprocessor, cfg, out, size=None, image_paths=None, threads=None,
                categories=None, tolerance=TOLERANCE):
    """Export model + postprocessor to the ONNX file ``out``, checked with ONNX Runtime.

    Args:
        model, postprocessor: as ``ddetr.engine.load_trained`` returns them (on the CPU).
        cfg: their Config (the default size, the file's metadata).
        out: the .onnx path; an existing file is replaced only if ddetr wrote it.
        size: (H, W) to trace and check at (default ``default_size(cfg)``).
        image_paths: images to check on (default: synthetic scenes).
        threads: ONNX Runtime's threads for the check (default: all).
        categories: {id: name}, kept in the file's metadata.
        tolerance: {"score", "box"} that ONNX Runtime must agree with PyTorch within.

    Returns:
        dict: path, size, min_side, opset, tolerance and "checks", one compare() result
        per checked batch with its "shape" (N, H, W).
    Raises:
        ExportMismatchError (nothing written) when ONNX Runtime disagrees with PyTorch.
    """
    out = Path(out)
    _check_target(out)
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("export_onnx runs on the CPU; load the model with device='cpu'")
    size = tuple(size or default_size(cfg))
    smallest = min_side(model)
    if min(size) < smallest:
        raise ValueError(f"size {size[0]}x{size[1]} is too small for this model: each side "
                         f"must be at least {smallest} pixels")
    detector = Detector(model, postprocessor).eval()
    # the trace's batch holds 2 images: a batch of 1 would fix the graph's batch size
    example = image_batch(check_images(None, size, count=2), size)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        with attention_backend(model, "reference"):
            _trace(detector, example, tmp, smallest)
        _write_metadata(tmp, cfg, smallest, categories)
        checks = _check(detector, tmp, size, smallest, image_paths, threads, tolerance)
        bad = [c for c in checks if not agrees(c, tolerance)]
        if bad:
            raise ExportMismatchError(
                f"ONNX Runtime disagrees with PyTorch, so {out} was not written: "
                + "; ".join(_describe(c) for c in bad)
                + f" (tolerance: score {tolerance['score']}, box {tolerance['box']} of "
                  f"the image side)")
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "size": list(size), "min_side": smallest, "opset": OPSET,
            "tolerance": dict(tolerance), "checks": checks}


def _check_target(out):
    """Refuse to replace a file that ddetr's exporter did not write."""
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; expected a .onnx file path")
    if not out.exists():
        return
    import onnx
    try:
        producer = onnx.load(str(out), load_external_data=False).producer_name
    except Exception:  # noqa: BLE001 - any file onnx cannot read is not ours
        producer = None
    if producer != PRODUCER:
        raise FileExistsError(f"{out} exists and was not written by ddetr's export; "
                              f"remove it or choose another --out")


def _trace(detector, example, path, smallest):
    """torch.onnx.export with dynamic batch and image sizes (sides >= smallest)."""
    from torch.export import Dim
    images, sizes = (torch.from_numpy(a) for a in example)
    batch = Dim("N", min=1)
    shapes = {"images": {0: batch, 2: Dim("H", min=smallest), 3: Dim("W", min=smallest)},
              "sizes": {0: batch}}
    # the exporter's progress (stdout), its notes on axis names (warnings) and the
    # optimizer's on what it left unfolded (onnxscript's log): the check below is
    # what tells whether the graph is right
    optimizer_log = logging.getLogger("onnxscript")
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(detector, (images, sizes), str(path), dynamo=True,
                              opset_version=OPSET, input_names=list(INPUTS),
                              output_names=list(OUTPUTS), dynamic_shapes=shapes,
                              external_data=False)
    finally:
        optimizer_log.setLevel(level)


def _write_metadata(path, cfg, smallest, categories):
    """Name ddetr as the producer and record min_side and the categories."""
    import onnx
    graph = onnx.load(str(path))
    graph.producer_name = PRODUCER
    meta = {"min_side": str(smallest), "inputs": "images (N, 3, H, W) float32 RGB in [0, 1]; "
            "sizes (N, 2) int64 (h, w) of the original images",
            "outputs": "scores (N, k); labels (N, k) int64; boxes (N, k, 4) x0y0x1y1 pixels",
            "categories": json.dumps({str(k): v for k, v in (categories or {}).items()}),
            "num_classes": str(cfg.num_classes)}
    del graph.metadata_props[:]
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def _check(detector, path, size, smallest, image_paths, threads, tolerance):
    """compare() results of ONNX Runtime against PyTorch on the check images at size,
    and on two images at a second size (the dynamic axes)."""
    session = onnx_session(path, threads)
    second = tuple(max(smallest, round(s * 3 / 4)) for s in size)
    batches = [image_batch(check_images(image_paths, size), size),
               image_batch(check_images(None, second, count=2, seed=1), second)]
    checks = []
    for images, sizes in batches:
        reference = run_torch(detector, images, sizes)
        diff = compare(reference, run_onnx(session, images, sizes), float(sizes.max()),
                       tolerance)
        checks.append({"shape": list(images.shape[:1] + images.shape[2:]), **diff})
    return checks


def _describe(check):
    N, H, W = check["shape"]
    return (f"{N} image(s) at {H}x{W}: scores differ by up to {check['score']:.2g}, "
            f"boxes by {check['box']:.2g} of the image side, {check['unmatched']} "
            f"detection(s) without a partner")
