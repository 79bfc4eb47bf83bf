"""ddetr.viz: every plotting function returns a figure without error; source excerpts
end where the chapters say."""
import ast
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ddetr.experiments.results import METRIC_KEYS, summary_table  # noqa: E402
from ddetr.config import get_config  # noqa: E402
from ddetr.viz import (architecture_shapes, draw_boxes, handmade_heads,  # noqa: E402
                       pixel_features, plot_architecture, plot_attention_maps,
                       plot_kernel_benchmark, plot_level_sampling, plot_loglog,
                       plot_sampling_points, show_source, synthetic_scene)
from ddetr.viz.convergence import (plot_convergence, plot_convergence_curve,  # noqa: E402
                                   plot_loss_curves, plot_size_breakdown)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


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


def _texts(fig):
    return "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_architecture_shapes_follow_the_strides():
    sh = architecture_shapes(get_config("paper"), image_size=(800, 1216))
    assert [lvl[2:] for lvl in sh["levels"]] == [(100, 152), (50, 76), (25, 38), (13, 19)]
    assert sh["S"] == 100 * 152 + 50 * 76 + 25 * 38 + 13 * 19
    assert sh["backbone"][-1] == ("N", 2048, 25, 38)
    single = architecture_shapes(get_config("paper_single_scale"), (64, 96))
    assert single["levels"] == [("N", 256, 2, 3)] and single["S"] == 6
    cfg = get_config("paper")
    cfg.backbone = "unknown"
    with pytest.raises(ValueError, match="backbone"):
        architecture_shapes(cfg)


def test_plot_architecture_draws_the_shapes():
    fig = plot_architecture(get_config("paper"), image_size=(800, 1216))
    text = _texts(fig)
    for shape in ["(N, 3, 800, 1216)", "(N, 2048, 25, 38)", "(N, 256, 13, 19)",
                  "(N, 20197, 256)", "(N, 300, 91)", "(N, 300, 4)", "query_embed"]:
        assert shape in text, shape
    two_stage = _texts(plot_architecture(get_config("cpu"), image_size=(256, 256)))
    assert "(N, 1360, 128)" in two_stage and "no NMS" in two_stage
    assert "query_embed" not in two_stage
    _, ax = plt.subplots()
    detr = _texts(plot_architecture(get_config("detr_paper"), (800, 1216), ax=ax))
    assert "(N, 950, 256)" in detr and "(N, 100, 256)" in detr and "dense" in detr
    assert "(N, 256, 13, 19)" not in detr


def test_plot_loglog_and_boxes():
    ax, slopes = plot_loglog([1, 2, 4], {"quadratic": [1, 4, 16], "linear": [1, 2, 4]})
    assert slopes["quadratic"] == pytest.approx(2) and slopes["linear"] == pytest.approx(1)
    draw_boxes(ax, [(0, 0, 1, 1)], ["x"])


def test_show_source():
    text = show_source("viz/source.py", "def show_source", "print it")
    assert text.startswith("ddetr/viz/source.py:") and "def show_source" in text
    assert text.splitlines()[-1].endswith("print it.")
    with pytest.raises(ValueError, match="does not occur"):
        show_source("viz/source.py", "this string does not occur anywhere 1234")
    with pytest.raises(ValueError, match="does not occur after"):
        show_source("viz/source.py", "def show_source", "no such end marker 1234")
    with pytest.raises(ValueError, match="a file of the ddetr package"):
        show_source("../README.md", "ddetr")


def test_show_source_end_marker_may_span_lines():
    """The end marker is matched against the text: "return c;\\n}" ends on the line of
    the function's closing brace."""
    text = show_source("csrc/ms_deform_attn.h", "Corners<acc_t, index_t> bilinear_corners",
                       "return c;\n}", max_lines=200)
    code = [line.split("  ", 1)[1] for line in text.splitlines()[1:]]
    assert code[-2:] == ["  return c;", "}"]
    assert "bilinear_corners" in code[0]


def _show_source_calls(notebook):
    """The literal arguments of every show_source(...) call in a notebook's code cells."""
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "show_source":
                yield ([ast.literal_eval(a) for a in node.args],
                       {k.arg: ast.literal_eval(k.value) for k in node.keywords})


@pytest.mark.parametrize("notebook", ["05_kernel.ipynb", "07_results.ipynb"])
def test_notebook_excerpts_end_at_their_end_marker(notebook):
    """Each excerpt of the chapter ends on the line where its end marker ends, not after
    max_lines lines."""
    calls = list(_show_source_calls(notebook))
    assert calls, f"no show_source calls found in {notebook}"
    for args, kwargs in calls:
        text = show_source(*args, **kwargs)
        end = args[2] if len(args) > 2 else kwargs["end"]
        excerpt = "\n".join(line.lstrip().split("  ", 1)[-1] if line.strip() else ""
                            for line in text.splitlines()[1:]) + "\n"
        at = excerpt.find(end)
        assert at >= 0, f"{args[:2]}: the excerpt does not contain its end marker {end!r}"
        assert "\n" not in excerpt[at + len(end):-1], \
            f"{args[:2]}: the excerpt goes on after its end marker {end!r}:\n{text}"


def test_plot_kernel_benchmark():
    impl = {"forward_ms": 2.0, "forward_backward_ms": 5.0}
    result = {"shapes": {"a": {"impls": {"reference": impl, "kernel": impl}},
                         "b": {"impls": {"reference": impl, "kernel": impl}}}}
    ax = plot_kernel_benchmark(result, title="t")
    assert len(ax.patches) == 8


def test_convergence_figures_take_models_and_colours_from_the_results():
    runs = [{"model": model, "label": model.upper(), "seed": seed,
             "evals": [{"step": 10, "epoch": 0.5, "wall_s": 1.0, "cpu_s": 2.0,
                        **{k: 0.1 * (seed + 1) for k in METRIC_KEYS}}],
             "loss": {"step": [10], "loss": [1.0]}}
            for model in ("first", "second", "third") for seed in (0, 1)]
    result = {"runs": runs, "settings": {"batch_size": 2, "train_images": 40}}

    def colours(ax):
        return {line.get_label().split(" (")[0]: line.get_color() for line in ax.lines}

    everything = colours(plot_convergence_curve(result))
    assert list(everything) == ["FIRST", "SECOND", "THIRD"]
    assert len(set(everything.values())) == 3
    subset = colours(plot_convergence_curve(result, models=["third"]))
    assert subset == {"THIRD": everything["THIRD"]}        # a model keeps its colour
    assert colours(plot_loss_curves(result)) == everything
    assert len(plot_convergence(result).axes) == 2
    ax = plot_size_breakdown(summary_table(result))
    assert len(ax.patches) == 3 * 3                     # 3 models x APs, APm, APl
