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


@pytest.mark.parametrize("backbone,dilation", [("resnet18", False), ("resnet50", True),
                                               ("regnet_x_400mf", False)])
def test_architecture_shapes_match_a_real_backbone(backbone, dilation):
    from ddetr.models.backbone import Backbone
    cfg = get_config("paper", {"backbone": backbone, "dilation": dilation})
    sh = architecture_shapes(cfg, image_size=(64, 96))
    with torch.no_grad():
        out = Backbone(backbone, dilation=dilation)(torch.zeros(1, 3, 64, 96),
                                                    torch.zeros(1, 64, 96, dtype=torch.bool))
    assert [("N", *f.shape[1:]) for f, _ in out] == sh["backbone"]


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


def test_animation_plays_offline():
    """ddetr.viz.animate: matplotlib's player, with no link to a CDN and its icons as
    text; one embedded frame per call of draw."""
    from ddetr.viz.animation import animate, offline_player

    fig, ax = plt.subplots(figsize=(1, 1))
    drawn = []

    def draw(i):
        drawn.append(i)
        ax.clear()
        ax.plot([0, i], [0, 1])
    anim = animate(fig, draw, 3)
    assert anim.frames == 3 and set(drawn) >= {0, 1, 2}
    assert anim.html.count("data:image/png;base64,") == 3 and anim.frame_bytes > 100
    assert "http" not in anim.html and "<link" not in anim.html
    assert 'class="fa' not in anim.html and "&#9654;" in anim.html
    assert anim._repr_html_() == anim.html
    with pytest.raises(ValueError, match="frames must be a positive int"):
        animate(plt.figure(), draw, 0)
    with pytest.raises(ValueError, match="frame_format"):
        animate(plt.figure(), draw, 1, frame_format="gif")
    with pytest.raises(ValueError, match="unknown player icon"):
        offline_player('<i class="fa fa-rocket"></i>')


def test_matching_and_cost_figures():
    from ddetr.viz.curves import plot_cost_terms, plot_focal_loss
    from ddetr.viz.matching import plot_colour_swatches, plot_matching_vs_nms

    image = np.ones((32, 32, 3))
    targets = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    preds = torch.cat([targets + 0.01, targets[:1] + 0.02])
    fig = plot_matching_vs_nms(image, targets, preds, [[(0, 0), (1, 1), (2, 0)],
                                                       [(0, 0), (1, 1)]], [0, 1], ["a", "b", "c"])
    assert len(fig.axes) == 3 and len(fig.axes[0].patches) == 2 * 2 + 3
    assert len(fig.axes[2].patches) == 2 * 2 + 2                        # NMS kept two
    fig = plot_colour_swatches(np.random.rand(5, 2, 3), list("abcde"), ["x", "y"])
    assert fig.axes[0].get_images()[0].get_array().shape == (5, 2, 3)
    ax = plot_focal_loss(0.25, 2.0)
    assert len(ax.lines) == 4
    hw = np.logspace(1, 4, 10)
    ax = plot_cost_terms(hw, {"a": hw, "b": hw ** 2}, crossings=[("here", 100)])
    assert len(ax.lines) == 3


@pytest.fixture(scope="module")
def reference_trace():
    from ddetr.data.synthetic import draw_image
    from ddetr.engine.checkpoint import load_compact
    from ddetr.experiments.probes import decoder_trace, model_input

    root = Path(__file__).resolve().parents[1]
    model, _, cfg, categories, _ = load_compact(root / "benchmarks" / "train_cpu_reference.pth")
    image, _ = draw_image(np.random.default_rng(5))
    return image, decoder_trace(model, model_input(cfg, image)), categories, cfg


def test_decoder_trace_follows_refinement_and_two_stage(reference_trace):
    """The trace of the trained reference model (two-stage, refinement): each layer's
    reference is the box of the layer before, and layer 0's are the encoder's top-k
    proposals (an independent recomputation from the model's outputs)."""
    _, trace, _, cfg = reference_trace
    D, Lq = cfg.dec_layers, cfg.num_queries
    assert trace["boxes"].shape == (D, Lq, 4) and trace["references"].shape == (D, Lq, 4)
    assert torch.allclose(trace["references"][1:], trace["boxes"][:-1], atol=1e-5)
    enc = trace["outputs"]["enc_outputs"]
    top = enc["pred_logits"][0, :, 0].topk(Lq)
    assert torch.allclose(trace["references"][0], enc["pred_boxes"][0, top.indices], atol=1e-5)
    assert torch.allclose(trace["proposal_scores"], top.values.sigmoid())
    assert torch.equal(trace["boxes"][-1], trace["outputs"]["pred_boxes"][0])
    assert set(trace["sampling"]) == set(range(D))
    assert trace["encoder"]["sampling_locations"].shape[0] == \
        int(trace["encoder"]["spatial_shapes"].prod(-1).sum())


def test_decoder_figures_and_views(reference_trace):
    from ddetr.viz.decoder import (animate_refinement, animate_two_stage, explore_sampling,
                                   plot_refinement, position_frames, query_frames)

    image, trace, categories, cfg = reference_trace
    best = trace["scores"][-1].argsort(descending=True)[:2].tolist()
    fig = plot_refinement(image, trace, best)
    assert len(fig.axes) == cfg.dec_layers
    assert animate_refinement(image, trace, best).frames == cfg.dec_layers
    anim = animate_two_stage(image, trace, 0.3, categories)
    assert anim.frames == cfg.dec_layers + 2 and "data:image/jpeg" in anim.html
    frames = query_frames(trace, best, categories)
    assert frames[0]["locations"].shape == (cfg.n_heads, cfg.num_feature_levels,
                                            cfg.dec_n_points, 2)
    view = explore_sampling(image, trace["encoder"]["spatial_shapes"],
                            frames + position_frames(trace["encoder"], [0, 1000]))
    assert view.frames == 4 and "http" not in view.html
    with pytest.raises(ValueError, match="two-stage"):
        animate_two_stage(image, {**trace, "proposal_scores": None})


def test_deformable_attention_diagram_traces_the_module():
    """Fig. 2 as a diagram: the trace's tensors have the module's shapes, the weighted
    sums are the operator's (checked inside the trace), and the figure shows them."""
    from ddetr.nn import DeformableAttention
    from ddetr.viz.module_diagram import (deformable_attention_trace,
                                          plot_deformable_attention)
    attn = DeformableAttention(d_model=32, n_heads=4, n_points=3)
    trace = deformable_attention_trace(attn, (5, 7))             # every pixel a query
    assert trace["offsets"].shape == (1, 35, 4, 3, 2)
    assert trace["samples"].shape == (1, 35, 4, 3, 8)
    assert trace["value"].shape == (1, 35, 4, 8) and trace["out"].shape == (1, 35, 32)
    torch.testing.assert_close(trace["out"], attn(trace["query"], trace["reference"],
                                                  trace["x"], (5, 7)).detach())
    assert deformable_attention_trace(attn, (5, 7), n_queries=6)["weights"].shape == (1, 6, 4, 3)
    fig = plot_deformable_attention(attn, (5, 7))
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "(1, 35, 4, 3, 8)" in texts and "2MK=24" in texts
    plt.close(fig)
