"""The toy trainings of chapters 3 and 4 (ddetr.experiments.toy_attention): they learn
what the chapters say they learn, on a fixed seed, in seconds; their measures agree
with brute-force counts; the figures and animations of ddetr.viz.toy draw them."""
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ddetr.experiments.toy_attention import (  # noqa: E402
    DeformableReader, DenseReader, MultiScaleReader, dense_mass_on_object, mass_on_object,
    measure, point_distance, snapshot_steps, take, toy_pyramid_scenes, toy_scenes,
    train_reader, with_noise)
from ddetr.viz.toy import (animate_toy_levels, animate_toy_training,  # noqa: E402
                           plot_dense_attention, plot_level_mass, plot_toy_levels,
                           plot_toy_losses, plot_toy_sampling, toy_image)


def teardown_function():
    plt.close("all")


@pytest.fixture(scope="module")
def scenes():
    return toy_scenes(256, seed=0), with_noise(toy_scenes(100, seed=1), seed=1)


def test_scenes_put_each_reference_point_beside_its_object(scenes):
    train, _ = scenes
    centres = (train["boxes"][..., :2] + train["boxes"][..., 2:]) / 2
    distance = (centres - train["reference"] * 32).norm(dim=-1)
    assert distance.min() >= 4 - 1e-4 or (train["reference"] * 32).min() <= 0.5
    # the pointer is the true displacement up to its noise (one pixel)
    error = (train["pointer"] - (centres - train["reference"] * 32)).norm(dim=-1)
    assert 0.5 < error.mean() < 2.0
    assert torch.equal(train["query"][..., :2], train["pointer"])
    # each object's class channel is lit inside its box, and only its own class
    n, q = 3, 1
    x0, y0, x1, y1 = train["boxes"][n, q].round().int().tolist()
    inside = train["signal"][n, :, y0 + 1:y1 - 1, x0 + 1:x1 - 1].mean((1, 2))
    assert inside.argmax() == train["labels"][n, q] and inside.max() > 0.5


def test_with_noise_is_seeded_and_fresh_per_generator(scenes):
    train, _ = scenes
    a, b = with_noise(train, seed=3), with_noise(train, seed=3)
    assert torch.equal(a["value"], b["value"])
    assert not torch.equal(a["value"], with_noise(train, seed=4)["value"])
    assert a["value"].shape == (256, 32 * 32, 32)


def test_measures_against_brute_force():
    boxes = torch.tensor([[[2.0, 2.0, 6.0, 6.0]]])                      # (1, 1, 4) pixels
    # four points: two inside the box, two outside; weights 0.1, 0.2, 0.3, 0.4
    loc = torch.tensor([[4.0, 4.0], [5.9, 2.1], [10.0, 4.0], [4.0, 9.0]]) / 16
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    mass = mass_on_object(loc.view(1, 1, 1, 4, 2), w.view(1, 1, 1, 4), boxes, 16, margin=0)
    assert mass.item() == pytest.approx(0.3)
    dist = point_distance(loc.view(1, 1, 1, 4, 2), w.view(1, 1, 1, 4), boxes, 16)
    expected = sum(wi * np.hypot(*(li.numpy() * 16 - 4)) for wi, li in zip(w, loc))
    assert dist.item() == pytest.approx(float(expected), rel=1e-5)
    # uniform dense attention puts on a box the share of pixel centres inside it
    uniform = torch.full((1, 2, 1, 256), 1 / 256)
    counted = sum(1 for i in range(16) for j in range(16)
                  if 2 <= j + 0.5 <= 6 and 2 <= i + 0.5 <= 6) / 256
    assert dense_mass_on_object(uniform, boxes, (16, 16), margin=0).item() == \
        pytest.approx(counted)


def test_snapshot_steps_start_dense_and_end_at_the_last_step():
    steps = snapshot_steps(400, 20)
    assert steps[0] == 0 and steps[-1] == 400 and steps[:3] == [0, 1, 2]
    assert steps == sorted(set(steps)) and len(steps) <= 21


def test_single_scale_toy_moves_the_points_onto_the_objects(scenes):
    """The chapter 3 training, shorter: offsets leave the star for the object."""
    train, test = scenes
    torch.manual_seed(0)
    reader = DeformableReader()
    before = measure(reader, test)
    start = time.perf_counter()
    history = train_reader(reader, train, take(test, slice(0, 1)), steps=200, snapshots=5)
    assert time.perf_counter() - start < 30
    after = measure(reader, test)
    assert after["distance"].mean() < 0.75 * before["distance"].mean()
    assert after["mass"].mean() > before["mass"].mean() + 0.2
    assert after["accuracy"].mean() > 0.6 > before["accuracy"].mean()
    assert len(history["loss"]) == 200 and history["snapshots"][-1]["step"] == 200
    # the first snapshot is the initial star: uniform weights
    assert torch.allclose(history["snapshots"][0]["weights"], torch.full((1, 3, 8, 4), 0.25))


def test_dense_reader_starts_uniform_and_trains(scenes):
    train, test = scenes
    torch.manual_seed(0)
    dense = DenseReader()
    history = train_reader(dense, train, take(test, slice(0, 1)), steps=20, snapshots=3)
    first = history["snapshots"][0]["attention"]                        # (1, M, Q, HW)
    assert first.shape == (1, 8, 3, 1024)
    assert torch.allclose(first.sum(-1), torch.ones(1, 8, 3), atol=1e-5)
    assert first.max() < 10 / 1024                                       # close to uniform
    assert set(measure(dense, test)) == {"accuracy", "mass"}


def test_multi_scale_toy_reads_small_objects_fine_and_large_ones_coarse():
    """The chapter 4 training, shorter: the known answer is which levels to read."""
    train = toy_pyramid_scenes(256, seed=0)
    test = with_noise(toy_pyramid_scenes(100, seed=1), seed=1)
    assert test["value"].shape == (100, 64 * 64 + 32 * 32 + 16 * 16 + 8 * 8, 16)
    torch.manual_seed(0)
    reader = MultiScaleReader()
    before = measure(reader, test)
    assert torch.allclose(before["levels"], torch.full((2, 4), 0.25))
    train_reader(reader, train, take(test, slice(0, 1)), steps=200, snapshots=3)
    after = measure(reader, test)
    small, large = after["levels"]
    assert small[:2].sum() > 0.65 and large[2:].sum() > 0.6
    assert (after["mass"] > before["mass"] + 0.2).all()


def test_toy_figures_and_animations(scenes):
    train, test = scenes
    display = take(test, slice(0, 1))
    torch.manual_seed(0)
    history = train_reader(DeformableReader(), train, display, steps=4, snapshots=3)
    dense_history = train_reader(DenseReader(), train, display, steps=4, snapshots=3)
    assert toy_image(display["signal"][0]).shape == (32, 32, 3)
    plot_toy_sampling(display, history)
    plot_dense_attention(display, dense_history)
    plot_toy_losses({"deformable": history, "dense": dense_history})
    anim = animate_toy_training(display, history)
    assert anim.frames == len(history["snapshots"]) and "http" not in anim.html
    pyramid = with_noise(toy_pyramid_scenes(2, seed=1), seed=1)
    ms_history = train_reader(MultiScaleReader(), toy_pyramid_scenes(8), pyramid, steps=2,
                              snapshots=2)
    plot_toy_levels(pyramid, ms_history)
    assert animate_toy_levels(pyramid, ms_history).frames == len(ms_history["snapshots"])
    plot_level_mass(np.full((2, 4), 0.25), np.eye(2, 4))
