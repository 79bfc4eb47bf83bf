"""ddetr.viz: every plotting function returns a figure without error."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ddetr.viz import (draw_boxes, handmade_heads, pixel_features,  # noqa: E402
                       plot_attention_maps, plot_level_sampling, plot_loglog,
                       plot_sampling_points, synthetic_scene)


def teardown_function():
    plt.close("all")


def test_synthetic_scene():
    image, boxes, labels = synthetic_scene(size=64, seed=1)
    assert image.shape == (64, 64, 3) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 1
    assert boxes.shape == (len(labels), 4)
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    with pytest.raises(ValueError):
        synthetic_scene(objects=[("star", "red", (0, 0, 1, 1))])


def test_pixel_features_and_handmade_heads():
    image, _, _ = synthetic_scene(size=64)
    f = pixel_features(image, stride=8)
    assert f.shape == (8, 8, 3)
    q, k = handmade_heads(f)
    assert q.shape == k.shape == (1, 2, 64, 3)
    # the position head prefers nearby keys: each query's best key is itself
    scores = q[0, 1] @ k[0, 1].T
    assert torch.equal(scores.argmax(1), torch.arange(64))


def test_plot_attention_maps():
    image, _, _ = synthetic_scene(size=32)
    fig = plot_attention_maps(image, torch.rand(3, 4, 4), torch.rand(3, 2), ["a", "b", "c"],
                              ncols=2)
    assert len(fig.axes) == 4


def test_plot_sampling_points():
    image, _, _ = synthetic_scene(size=32)
    fig = plot_sampling_points(image, torch.tensor([0.5, 0.5]), torch.rand(4, 3, 2),
                               torch.rand(4, 3).softmax(-1), title="t", zoom=0.3)
    assert len(fig.axes) == 1
    fig = plot_sampling_points(np.zeros((8, 8)), [0.5, 0.5], np.random.rand(2, 2, 2),
                               np.ones((2, 2)) / 2)
    assert len(fig.axes) == 1


def test_plot_level_sampling():
    levels = [np.random.rand(8, 8, 3), np.random.rand(4, 4, 3)]
    fig = plot_level_sampling(levels, torch.tensor([0.3, 0.6]), torch.rand(2, 2, 3, 2),
                              torch.rand(2, 2, 3))
    assert len(fig.axes) == 2


def test_plot_loglog_and_boxes():
    ax, slopes = plot_loglog([1, 2, 4], {"quadratic": [1, 4, 16], "linear": [1, 2, 4]})
    assert slopes["quadratic"] == pytest.approx(2) and slopes["linear"] == pytest.approx(1)
    draw_boxes(ax, [(0, 0, 1, 1)], ["x"])


def test_show_source():
    from ddetr.viz import show_source
    text = show_source("ddetr/viz/source.py", "def show_source", "print it")
    assert text.startswith("ddetr/viz/source.py:") and "def show_source" in text
    with pytest.raises(ValueError):
        show_source("ddetr/viz/source.py", "this string does not occur anywhere 1234")


def test_plot_kernel_benchmark():
    from ddetr.viz import plot_kernel_benchmark
    impl = {"forward_ms": 2.0, "forward_backward_ms": 5.0}
    result = {"shapes": {"a": {"impls": {"reference": impl, "kernel": impl}},
                         "b": {"impls": {"reference": impl, "kernel": impl}}}}
    ax = plot_kernel_benchmark(result, title="t")
    assert len(ax.patches) == 8
