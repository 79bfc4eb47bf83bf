"""The experiment's quick mode end to end: it trains every model of the experiment for a
few steps on a tiny generated set and writes results of the documented schema."""
import json

import pytest
import torch

from ddetr.experiment import (METRIC_KEYS, RUNS, SCHEMA, load_compact, load_results,
                              markdown_summary, summary_table)


@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path, monkeypatch):
    from ddetr.__main__ import main

    monkeypatch.chdir(tmp_path)          # the tiny data set and the runs go here
    monkeypatch.setenv("DDETR_QUICK", "1")
    assert main(["experiment", "convergence", "--out", "results"]) == 0
    result = load_results(tmp_path / "results" / "convergence.json")
    assert result["schema"] == SCHEMA and result["quick"] is True
    for key in ("command", "commit", "machine", "date", "settings", "runs", "pending",
                "paper", "load_average"):
        assert key in result, key
    assert result["machine"]["cpu_cores"] >= 1 and result["machine"]["torch"]
    assert result["pending"] == []
    assert [r["model"] for r in result["runs"]] == [r[0] for r in RUNS]
    steps = result["settings"]["steps"]
    for run in result["runs"]:
        assert run["steps"] == steps and run["seed"] == 0 and run["params"] > 0
        assert [e["step"] for e in run["evals"]] == list(
            range(result["settings"]["eval_every"], steps + 1, result["settings"]["eval_every"]))
        for e in run["evals"]:
            assert set(METRIC_KEYS) <= set(e) and all(0 <= e[k] <= 1 for k in METRIC_KEYS)
        assert len(run["loss"]["loss"]) == len(run["loss"]["step"])
        walls = [e["wall_s"] for e in run["evals"]]
        assert walls == sorted(walls) and walls[-1] <= run["wall_s"] + 1e-6
    rows = summary_table(result)
    assert len(rows) == len(RUNS) and all(r["seeds"] == 1 for r in rows)
    md = (tmp_path / "results" / "convergence.md").read_text()
    assert md == markdown_summary(result) and "Quick mode" in md
    # the compact multi-scale weights load into a working model
    ms = next(r for r in result["runs"] if r["model"] == "deformable_multi_scale")
    assert 0 <= ms["compact_AP"] <= 1
    model, _, cfg, _, source = load_compact(tmp_path / "results" /
                                            "convergence_multi_scale_seed0.pth")
    assert cfg.num_feature_levels == 4 and source["steps"] == steps
    out = model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert out["pred_boxes"].shape == (1, cfg.num_queries, 4)


def test_recorded_results_follow_the_schema():
    """The committed full-run results (if present) follow the schema and are not quick."""
    from pathlib import Path
    path = Path(__file__).parent.parent / "benchmarks" / "convergence.json"
    if not path.is_file():
        pytest.skip("no recorded results")
    result = load_results(path)
    assert result["quick"] is False and result["commit"]
    assert {r["model"] for r in result["runs"]} >= {"detr", "deformable_single_scale",
                                                    "deformable_multi_scale"}
    json.dumps(result)


def test_dab_queries_are_a_config_switch():
    from ddetr.config import get_config
    from ddetr.models import build_model

    cfg = get_config("cpu", {"query_anchors": "dab", "two_stage": False, "enc_layers": 1,
                             "dec_layers": 2})
    model = build_model(cfg)[0].eval()
    assert model.refpoint_embed.weight.shape == (cfg.num_queries, 4)
    images, masks = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, :, 100:] = True
    out = model(images, masks)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    with pytest.raises(ValueError, match="with_box_refine"):
        build_model(get_config("cpu", {"query_anchors": "dab", "with_box_refine": False,
                                       "two_stage": False}))
    with pytest.raises(ValueError, match="two_stage"):    # the preset is two-stage
        build_model(get_config("cpu", {"query_anchors": "dab"}))
    with pytest.raises(ValueError, match="query_anchors"):
        build_model(get_config("cpu", {"query_anchors": "anchor"}))
