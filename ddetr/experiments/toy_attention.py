"""Toy trainings that show what deformable attention learns, in seconds on a CPU
(chapters 3 and 4).

The task has a known answer. A scene is a feature map with a few square objects, each
of one of ``classes`` classes (channel c of the map is "class c is here", blurred a
little as a backbone's features are, plus noise everywhere). Every object has a query
that must say the object's class. The query's reference point lies *beside* its object,
not on it, and its content is a rough pointer to the object: the displacement from
the reference point to the object's centre, with a pixel of noise, in its first two
channels (in a detector this is what a query learns from the layers before). So the
right place to look is known: the object. At initialisation deformable attention
samples its star around the reference point and sees mostly background; training must
move the points onto the object and the weight onto the points that reach it.

    single scale    ``toy_scenes`` + ``DeformableReader``: DeformableAttention on one map
    dense baseline  ``DenseReader``: DETR's attention on the same scenes (its query is
                    the position code of the point the pointer names; the keys carry
                    their own position codes), trained for the same steps
    multi-scale     ``toy_pyramid_scenes`` + ``MultiScaleReader``: MSDeformAttn on four
                    levels, one small and one large object per scene, textured inside
                    (a single fine pixel of a large object is noisy, its coarse pixels
                    average the texture out; a small object is diluted away on the
                    coarse levels)

``train_reader`` trains any of them and keeps snapshots of where a few display
queries look, for the figures and animations of ``ddetr.viz.toy``. The measures of
success: ``point_distance`` (how far the weighted points are from the object centre),
``mass_on_object`` (how much weight lands inside the object's box) and, multi-scale,
``mass_per_level``.
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn import DeformableAttention, MSDeformAttn, MultiHeadAttention
from ..nn.geometry import pixel_centres
from ..nn.position_encoding import sine_embed
from ..ops import level_start_index_of


# --- scenes ----------------------------------------------------------------------------

def _place_squares(rng, size, sides, gap=2.0, margin=1.0):
    """Non-overlapping squares of the given sides in a size x size map: (n, 4) x0y0x1y1
    pixels, or None if they did not fit in 200 tries."""
    boxes = []
    for side in sides:
        for _ in range(200):
            x0, y0 = rng.uniform(margin, size - margin - side, 2)
            box = np.array([x0, y0, x0 + side, y0 + side])
            if all(box[0] > b[2] + gap or box[2] < b[0] - gap or box[1] > b[3] + gap
                   or box[3] < b[1] - gap for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return np.stack(boxes)


def _paint(maps, boxes, labels, texture, rng):
    """Write class channel labels[q] = 1 (+ texture noise) inside each box of a
    (C, H, W) numpy map, in place."""
    H, W = maps.shape[1:]
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    for box, label in zip(boxes, labels):
        inside = (xs >= box[0]) & (xs < box[2]) & (ys >= box[1]) & (ys < box[3])
        maps[label][inside] += 1.0 + texture * rng.standard_normal(int(inside.sum()))


def _blur(maps, sigma):
    """Gaussian blur of (N, C, H, W), per channel, zero padding."""
    if sigma <= 0:
        return maps
    r = int(math.ceil(3 * sigma))
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    g = g / g.sum()
    C = maps.shape[1]
    maps = F.conv2d(maps, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), padding=(0, r), groups=C)
    return F.conv2d(maps, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), padding=(r, 0), groups=C)


def _pointers(rng, boxes, size, near, far, hint_noise):
    """Reference points beside each box and the noisy pointers to its centre.

    A displacement of length U(near, far) pixels (scaled per box if near/far are arrays)
    in a random direction, kept inside the map. Returns reference (Q, 2) and pointer
    (Q, 2) in pixels."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    refs = np.empty_like(centres)
    for q, c in enumerate(centres):
        for _ in range(100):
            angle = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(np.atleast_1d(near)[q % np.size(near)],
                                 np.atleast_1d(far)[q % np.size(far)])
            refs[q] = c - length * np.array([np.cos(angle), np.sin(angle)])
            if (refs[q] > 0.5).all() and (refs[q] < size - 0.5).all():
                break
        else:
            refs[q] = np.clip(refs[q], 0.5, size - 0.5)
    pointer = centres - refs + hint_noise * rng.standard_normal(refs.shape)
    return refs, pointer


def toy_scenes(num, size=32, num_objects=3, classes=4, channels=32, sides=(4, 7),
               distance=(4.0, 8.0), hint_noise=1.0, blur=1.0, noise=1.0, seed=0):
    """Single-scale toy scenes.

    Args:
        num: scenes; size: the map is size x size pixels; num_objects: objects (and
        queries) per scene; classes: object classes (channels 0..classes-1 of the map);
        channels: C; sides: (min, max) side of the squares in pixels; distance: (min,
        max) pixels from a reference point to its object's centre; hint_noise: pixels
        of noise on the pointer; blur: sigma of the features' blur; noise: background
        noise on every channel.

    Returns a dict of tensors: "signal" (N, classes, H, W) the objects' channels
    (``with_noise`` makes the value map the readers read, (N, H*W, C), from it and the
    "noise" level); "shape" (H, W);
    "query" (N, Q, C) with the pointer (in pixels) in channels 0-1;
    "reference" (N, Q, 2) in [0, 1]; "pointer" (N, Q, 2) in pixels; "boxes" (N, Q, 4)
    x0y0x1y1 pixels; "labels" (N, Q) int64.
    """
    rng = np.random.default_rng(seed)
    maps = np.zeros((num, classes, size, size), np.float32)
    boxes = np.zeros((num, num_objects, 4), np.float32)
    labels = rng.integers(classes, size=(num, num_objects))
    refs = np.zeros((num, num_objects, 2), np.float32)
    pointers = np.zeros_like(refs)
    for n in range(num):
        placed = None
        while placed is None:
            placed = _place_squares(rng, size, rng.uniform(*sides, num_objects))
        boxes[n] = placed
        _paint(maps[n], placed, labels[n], 0.0, rng)
        refs[n], pointers[n] = _pointers(rng, placed, size, *distance, hint_noise)
    query = torch.zeros(num, num_objects, channels)
    query[..., :2] = torch.from_numpy(pointers)
    return {"signal": _blur(torch.from_numpy(maps), blur), "shape": (size, size),
            "query": query, "reference": torch.from_numpy(refs) / size,
            "pointer": torch.from_numpy(pointers), "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels), "noise": noise}


def toy_pyramid_scenes(num, size=64, levels=4, classes=4, channels=16, small=(2.0, 3.0),
                       large=(20.0, 28.0), hint_noise=0.1, texture=1.5, noise=0.3, seed=0):
    """Multi-scale toy scenes: one small and one large object per scene (query 0 is the
    small one's, query 1 the large one's), the map average-pooled into ``levels``
    levels (strides 1, 2, 4, ...).

    Large objects' interiors are textured (class channel 1 + texture * noise per
    pixel) and every pixel has noise: a fine pixel is an unreliable reading of a large
    object, a coarse pixel averages the texture away, and on a coarse pixel a small
    object is diluted by the background around it. The reference point lies 0.6 to 1.2
    object sizes from the object's centre; the pointer (noise: hint_noise object
    sizes) fills query channels 0-1 (pixels / size) and the object's log size
    (log2(side / 8)) channel 2.

    Returns the dict of ``toy_scenes`` with "spatial_shapes" (L, 2) and
    "level_start_index" (L,) instead of "shape" (``with_noise`` adds the noise to the
    finest map and pools it: "value" (N, S, C), all levels flattened and
    concatenated), plus "sides" (N, 2) in pixels of the finest level.
    """
    rng = np.random.default_rng(seed)
    maps = np.zeros((num, classes, size, size), np.float32)
    boxes = np.zeros((num, 2, 4), np.float32)
    labels = rng.integers(classes, size=(num, 2))
    refs = np.zeros((num, 2, 2), np.float32)
    pointers = np.zeros_like(refs)
    sides = np.zeros((num, 2), np.float32)
    for n in range(num):
        placed = None
        while placed is None:
            sides[n] = rng.uniform(*small), rng.uniform(*large)
            placed = _place_squares(rng, size, sides[n], gap=1.0)
        boxes[n] = placed
        _paint(maps[n], placed[:1], labels[n, :1], 0.0, rng)
        _paint(maps[n], placed[1:], labels[n, 1:], texture, rng)
        refs[n], pointers[n] = _pointers(rng, placed, size, 0.6 * sides[n], 1.2 * sides[n],
                                         0.0)
        pointers[n] += hint_noise * sides[n][:, None] * rng.standard_normal((2, 2))
    shapes = torch.tensor([(size >> lvl, size >> lvl) for lvl in range(levels)])
    query = torch.zeros(num, 2, channels)
    query[..., :2] = torch.from_numpy(pointers)
    query[..., 2] = torch.from_numpy(np.log2(sides / 8.0))
    return {"signal": torch.from_numpy(maps), "noise": noise,
            "spatial_shapes": shapes, "level_start_index": level_start_index_of(shapes),
            "query": query, "reference": torch.from_numpy(refs) / size,
            "pointer": torch.from_numpy(pointers), "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels), "sides": torch.from_numpy(sides)}


def take(scenes, index):
    """The scenes at index (a slice or an index tensor), the map tables kept whole."""
    keep = ("shape", "spatial_shapes", "level_start_index", "noise")
    return {k: v if k in keep else v[index] for k, v in scenes.items()}


def with_noise(scenes, generator=None, seed=None):
    """The scenes with "value" (N, S, C) made: the signal padded to C channels, plus
    noise * N(0, 1) on every channel of every pixel of the finest map, pooled into the
    levels of a pyramid, flattened. ``train_reader`` draws new noise for every batch,
    so a model cannot learn a scene's noise by heart."""
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    signal = scenes["signal"]
    N, classes, H, W = signal.shape
    C = scenes["query"].shape[-1]
    fine = F.pad(signal, (0, 0, 0, 0, 0, C - classes))
    fine = fine + scenes["noise"] * torch.randn(fine.shape, generator=generator)
    levels = len(scenes["spatial_shapes"]) if "spatial_shapes" in scenes else 1
    maps = [F.avg_pool2d(fine, 2 ** lvl) if lvl else fine for lvl in range(levels)]
    value = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
    return {**scenes, "value": value}


# --- the three readers -----------------------------------------------------------------

class DeformableReader(nn.Module):
    """DeformableAttention (M heads, K points) + a linear classifier of its output."""

    def __init__(self, channels=32, n_heads=8, n_points=4, classes=4):
        super().__init__()
        self.attn = DeformableAttention(channels, n_heads, n_points)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, scenes):
        """-> class logits (N, Q, classes)."""
        out = self.attn(scenes["query"], scenes["reference"], scenes["value"], scenes["shape"])
        return self.classifier(out)

    def sampling(self, scenes):
        """-> locations (N, Q, M, K, 2) in [0, 1], weights (N, Q, M, K)."""
        return self.attn.sampling(scenes["query"], scenes["reference"], scenes["shape"])


class DenseReader(nn.Module):
    """DETR's attention + the same classifier. Query: the sine position code of the
    point the pointer names (reference + pointer); keys: map + its pixels' position
    codes; values: the map."""

    def __init__(self, channels=32, n_heads=8, classes=4):
        super().__init__()
        self.attn = MultiHeadAttention(channels, n_heads)
        self.classifier = nn.Linear(channels, classes)

    def _inputs(self, scenes):
        H, W = scenes["shape"]
        C = scenes["value"].shape[-1]
        named = scenes["reference"] + scenes["pointer"] / scenes["reference"].new_tensor([W, H])
        query = sine_embed(named, C // 2)
        key = scenes["value"] + sine_embed(pixel_centres(H, W), C // 2)[None]
        return query, key, scenes["value"]

    def forward(self, scenes):
        return self.classifier(self.attn(*self._inputs(scenes))[0])

    def attention(self, scenes):
        """-> weights (N, M, Q, H*W) over the map's pixels."""
        return self.attn(*self._inputs(scenes))[1]


class MultiScaleReader(nn.Module):
    """MSDeformAttn (L levels, M heads, K points) + a linear classifier."""

    def __init__(self, channels=16, n_levels=4, n_heads=8, n_points=4, classes=4):
        super().__init__()
        self.attn = MSDeformAttn(channels, n_levels, n_heads, n_points, backend="reference")
        self.classifier = nn.Linear(channels, classes)

    def _reference(self, scenes):
        return scenes["reference"][:, :, None].expand(-1, -1, self.attn.n_levels, -1)

    def forward(self, scenes):
        out = self.attn(scenes["query"], self._reference(scenes), scenes["value"],
                        scenes["spatial_shapes"], scenes["level_start_index"])
        return self.classifier(out)

    def sampling(self, scenes):
        """-> locations (N, Q, M, L, K, 2) in [0, 1], weights (N, Q, M, L, K)."""
        return self.attn.sampling(scenes["query"], self._reference(scenes),
                                  scenes["spatial_shapes"])


# --- measures --------------------------------------------------------------------------

def _centres(boxes):
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def point_distance(locations, weights, boxes, size):
    """How far a query's points are from its object's centre: the weighted mean
    distance in pixels of the finest map, (N, Q).

    locations (N, Q, ..., 2) in [0, 1] of a size x size map (any number of head, level
    and point axes), weights (N, Q, ...) over the same points, boxes (N, Q, 4) pixels.
    """
    N, Q = weights.shape[:2]
    points = locations.reshape(N, Q, -1, 2) * size
    w = weights.reshape(N, Q, -1)
    dist = (points - _centres(boxes)[:, :, None]).norm(dim=-1)
    return (w * dist).sum(-1) / w.sum(-1)


def mass_on_object(locations, weights, boxes, size, margin=0.5):
    """The share of a query's attention weight on points inside its object's box
    (grown by margin pixels), (N, Q)."""
    N, Q = weights.shape[:2]
    points = locations.reshape(N, Q, -1, 2) * size
    w = weights.reshape(N, Q, -1)
    lo, hi = boxes[:, :, None, :2] - margin, boxes[:, :, None, 2:] + margin
    inside = ((points >= lo) & (points <= hi)).all(-1)
    return (w * inside).sum(-1) / w.sum(-1)


def dense_mass_on_object(attention, boxes, shape, margin=0.5):
    """The same for dense attention: attention (N, M, Q, H*W) -> (N, Q), the weight on
    pixels whose centre is inside the grown box, averaged over heads."""
    H, W = shape
    centres = pixel_centres(H, W) * torch.tensor([W, H])                # (HW, 2) pixels
    lo, hi = boxes[:, :, None, :2] - margin, boxes[:, :, None, 2:] + margin
    inside = ((centres >= lo) & (centres <= hi)).all(-1)                # (N, Q, HW)
    return (attention * inside[:, None]).sum(-1).mean(1)


def mass_per_level(weights):
    """weights (N, Q, M, L, K) -> (N, Q, L): each level's share of a query's weight,
    averaged over heads (the L shares sum to one)."""
    return weights.sum(-1).mean(2)


# --- training --------------------------------------------------------------------------

def snapshot(model, scenes):
    """Where model looks for the queries of scenes: {"locations", "weights"} of a
    deformable reader, {"attention"} of the dense one (detached)."""
    with torch.no_grad():
        if isinstance(model, DenseReader):
            return {"attention": model.attention(scenes)}
        locations, weights = model.sampling(scenes)
        return {"locations": locations, "weights": weights}


def snapshot_steps(steps, count):
    """count training steps from 0 to steps, denser at the start where things move
    fastest (geometric spacing, the first few steps one by one)."""
    s = np.unique(np.round(np.geomspace(1, steps + 1, count)).astype(int) - 1)
    return sorted(set(s.tolist()) | {0, steps})


def train_reader(model, scenes, display, steps=400, batch=32, lr=1e-2, snapshots=20,
                 seed=0):
    """Train model to say each query's object class (cross-entropy) with Adam.

    Args:
        model: a DeformableReader, DenseReader or MultiScaleReader.
        scenes: training scenes (each batch gets fresh noise, ``with_noise``);
        display: a few scenes with their noise drawn, whose sampling is kept.
        steps, batch (scenes per step), lr; snapshots: how many ``snapshot``s of
        display to keep (``snapshot_steps``); seed: the order of the batches.

    Returns history: "loss" (steps,) per step, "accuracy" (steps,) of each batch,
    "snapshots": [{"step", "loss", **snapshot(model, display)}] (the loss of the
    display scenes at that step), "seconds". Runs on one CPU thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # tensors this small run fastest on one thread
    try:
        return _train(model, scenes, display, steps, batch, lr, snapshots, seed)
    finally:
        torch.set_num_threads(threads)


def _train(model, scenes, display, steps, batch, lr, snapshots, seed):
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    keep = set(snapshot_steps(steps, snapshots))
    history = {"loss": [], "accuracy": [], "snapshots": []}
    n = scenes["query"].shape[0]
    start = time.perf_counter()
    for step in range(steps + 1):
        if step in keep:
            with torch.no_grad():
                display_loss = F.cross_entropy(model(display).flatten(0, 1),
                                               display["labels"].flatten()).item()
            history["snapshots"].append({"step": step, "loss": display_loss,
                                         **snapshot(model, display)})
        if step == steps:
            break
        batch_scenes = with_noise(take(scenes, torch.randint(n, (batch,), generator=g)), g)
        logits = model(batch_scenes).flatten(0, 1)
        labels = batch_scenes["labels"].flatten()
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history["loss"].append(loss.item())
        history["accuracy"].append((logits.argmax(-1) == labels).float().mean().item())
    history["seconds"] = time.perf_counter() - start
    return history


def measure(model, scenes):
    """How model does on scenes (noise drawn), per query index q (averaged over the
    scenes): "accuracy" (Q,); for dense attention "mass" (Q,) from
    ``dense_mass_on_object``; for deformable attention "distance" (Q,) pixels from
    ``point_distance``, "mass" (Q,) from ``mass_on_object`` and, multi-scale,
    "levels" (Q, L) from ``mass_per_level``."""
    with torch.no_grad():
        right = (model(scenes).argmax(-1) == scenes["labels"]).float().mean(0)
    snap, boxes = snapshot(model, scenes), scenes["boxes"]
    size = scenes["signal"].shape[-1]
    if "attention" in snap:
        return {"accuracy": right,
                "mass": dense_mass_on_object(snap["attention"], boxes, scenes["shape"]).mean(0)}
    result = {"accuracy": right,
              "distance": point_distance(snap["locations"], snap["weights"], boxes,
                                         size).mean(0),
              "mass": mass_on_object(snap["locations"], snap["weights"], boxes, size).mean(0)}
    if snap["weights"].dim() == 5:
        result["levels"] = mass_per_level(snap["weights"]).mean(0)
    return result
