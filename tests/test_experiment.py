"""The convergence experiment: its quick mode end to end (it trains every model for a
few steps on a tiny generated set and writes results of the documented schema), the
recorded results, the statistics computed from them, and the process pool."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddetr.__main__ import main
from ddetr.config import get_config
from ddetr.engine.checkpoint import load_compact
from ddetr.config import MODEL_KEYS
from ddetr.experiments.claims import convergence_claim, scale_claim
from ddetr.experiments.convergence import (BASE, CORE, FULL, RUNS, experiment_settings,
                                           run_config, run_order)
from ddetr.experiments.results import (METRIC_KEYS, SCHEMA, eval_curves, load_results,
                                       loss_curves, markdown_summary, models_of, spearman,
                                       summary_table)
from ddetr.experiments.runner import run_jobs
from ddetr.models import build_model

RECORDED = Path(__file__).parent.parent / "benchmarks" / "convergence.json"


@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path, monkeypatch):
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
            assert set(METRIC_KEYS) <= set(e) and e["AP"] is not None
            assert all(e[k] is None or 0 <= e[k] <= 1 for k in METRIC_KEYS)  # None: n/a
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
    # the objects per size class, counted from the annotation files the runs read
    val = json.loads((tmp_path / "data" / "synthetic_experiment_quick" / "annotations" /
                      "instances_val2017.json").read_text())
    assert sum(result["data"]["val"].values()) == len(val["annotations"])
    # each run says which commit trained it; running the command again reads the
    # finished runs back, trains nothing and adds no provenance
    assert all(r["trained_at"] == [result["runs"][0]["trained_at"][0]] for r in result["runs"])
    assert result["runs"][0]["trained_at"][0]["commit"] == result["commit"]
    assert main(["experiment", "convergence", "--out", "again", "--models", "detr"]) == 0
    again = load_results(tmp_path / "again" / "convergence.json")
    assert again["runs"][0]["evals"] == result["runs"][0]["evals"]
    assert again["runs"][0]["trained_at"] == result["runs"][0]["trained_at"]


def test_recorded_results_follow_the_schema():
    """The committed full-run results (if present) follow the schema and are not quick."""
    if not RECORDED.is_file():
        pytest.skip("no recorded results")
    result = load_results(RECORDED)
    assert result["quick"] is False and result["commit"]
    assert {r["model"] for r in result["runs"]} >= {"detr", "deformable_single_scale",
                                                    "deformable_multi_scale"}
    json.dumps(result)


def test_run_order_puts_every_model_first_and_late_seeds_last():
    runs = [r for r in RUNS]
    order = [(r[0], s) for r, s in run_order(runs, [0, 1, 2], [0])]
    names = [r[0] for r in RUNS]
    assert order[:len(names)] == [(n, 0) for n in names]
    assert order[len(names):] == [(n, s) for s in (1, 2) for n in CORE]
    order = [(r[0], s) for r, s in run_order(runs, [0, 1], [0, 1])]
    assert order[-2:] == [("deformable_refine", 1), ("deformable_dab", 1)]


def test_the_experiment_models_differ_where_their_names_say():
    """Every model is the experiment's recipe (BASE: the cpu preset as it was, with 2
    decoder layers where the preset now has 4) with the switches of its row: the dense
    baseline differs from single-scale deformable attention in the attention only."""
    cfgs = {name: run_config(name, overrides, 0, FULL, "runs/x") for name, _, overrides
            in RUNS}
    preset = get_config("cpu", BASE)
    now = get_config("cpu")
    assert {k for k in MODEL_KEYS if getattr(now, k) != getattr(preset, k)} == {
        "dec_layers", "with_box_refine", "two_stage", "dn_detr"}   # BASE: the switches off
    for name, cfg in cfgs.items():
        differ = {k for k in MODEL_KEYS if getattr(cfg, k) != getattr(preset, k)}
        assert differ <= {"attention", "num_feature_levels", "with_box_refine",
                          "two_stage", "query_anchors"}, (name, differ)
        assert (cfg.backbone, cfg.amp, cfg.lr) == (preset.backbone, preset.amp, preset.lr)
    single, dense = cfgs["deformable_single_scale"], cfgs["detr"]
    assert {k for k in MODEL_KEYS if getattr(single, k) != getattr(dense, k)} == {"attention"}
    assert cfgs["detr"].epochs == 8 and cfgs["detr"].lr_drop == 7     # the drop after 7


def test_dab_queries_are_a_config_switch():
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


def _result(curves):
    """A results dict with one run per (model, seed, [AP at steps 10, 20, ...])."""
    runs = [{"model": model, "label": model.upper(), "seed": seed,
             "evals": [{"step": 10 * (i + 1), "epoch": 0.5 * (i + 1), "wall_s": 1.0 + i,
                        "cpu_s": 2.0 + i, **{k: ap for k in METRIC_KEYS}}
                       for i, ap in enumerate(aps)],
             "loss": {"step": [10, 20], "loss": [2.0 - seed, 1.0]}}
            for model, seed, aps in curves]
    return {"runs": runs, "settings": {"batch_size": 2, "train_images": 40}}


def test_summary_statistics_of_results():
    result = _result([("b", 0, [0.1, 0.3]), ("b", 1, [0.2]), ("a", 0, [0.0, 0.5])])
    assert models_of(result) == ["b", "a"]
    xs, ys = eval_curves(result, "b", "AP", "epoch")      # truncated to the common evals
    assert xs.tolist() == [[0.5], [0.5]] and ys.tolist() == [[0.1], [0.2]]
    rows = {r["model"]: r for r in summary_table(result)}
    assert rows["b"]["seeds"] == 2 and rows["b"]["step"] == 10
    assert rows["b"]["AP"] == pytest.approx(0.15)
    assert (rows["b"]["AP_min"], rows["b"]["AP_max"]) == (0.1, 0.2)
    assert rows["a"]["AP"] == 0.5 and rows["a"]["step"] == 20
    xs, ys = loss_curves(result, "b", "epoch")            # steps * batch / images
    assert xs.tolist() == [0.5, 1.0] and ys.tolist() == [[2.0, 1.0], [1.0, 1.0]]
    assert loss_curves(result, "c") == (None, None)
    with pytest.raises(ValueError, match="no runs of model 'c'"):
        eval_curves(result, "c")
    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert np.isnan(spearman([1], [2]))


def test_markdown_summary_of_the_recorded_results():
    if not RECORDED.is_file():
        pytest.skip("no recorded results")
    result = load_results(RECORDED)
    md = markdown_summary(result)
    for row in summary_table(result):
        assert f"| {row['label']} | {row['seeds']} | {row['step']} |" in md
    for run in result["runs"]:            # every commit that trained a run is named
        for entry in run["trained_at"]:
            assert entry["commit"][:7] in md.split("Runs trained at:")[1].split("\n")[0]


def test_load_results_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results file"):
        load_results(tmp_path / "convergence.json")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something/1"}))
    with pytest.raises(ValueError, match="schema 'something/1'"):
        load_results(tmp_path / "other.json")


@pytest.mark.parametrize("processes", [1, 2])
def test_run_jobs_reports_results_and_errors(processes):
    results, errors = [], []
    jobs = [(7, 2), (9, 4)] + ([(1, 0)] if processes > 1 else [])
    run_jobs(divmod, jobs, processes, results.append,
             lambda args, err: errors.append((args, type(err))))
    assert sorted(results) == [(2, 1), (3, 1)]
    assert errors == ([((1, 0), ZeroDivisionError)] if processes > 1 else [])


def test_summary_table_keeps_unmeasured_metrics_apart():
    """A metric COCOeval could not measure (None: no objects of that size) is left out of
    the mean and printed as n/a, never counted as 0."""
    run = lambda seed, aps: {"model": "m", "label": "M", "seed": seed, "evals": [
        {"step": 10, "epoch": 1.0, "wall_s": 1.0, "cpu_s": 1.0, "AP": 0.5, "AP50": 0.6,
         "AP75": 0.4, "APs": aps, "APm": 0.5, "APl": None}]}
    result = {"runs": [run(0, 0.2), run(1, None)]}
    row, = summary_table(result)
    assert row["APs"] == 0.2 and (row["APs_min"], row["APs_max"]) == (0.2, 0.2)
    assert row["APl"] is None and row["APl_min"] is None


def test_convergence_claim_from_mean_curves():
    # fast reaches slow's final 0.2 at epoch 1.0 (of 2.0 evaluated) and ends at 0.4
    result = _result([("fast", 0, [0.2, 0.4, 0.45]), ("fast", 1, [0.2, 0.4, 0.35]),
                      ("slow", 0, [0.0, 0.1, 0.2]), ("slow", 1, [0.0, 0.1, 0.2])])
    c = convergence_claim(result, "fast", "slow")
    assert c["fast_reaches_slow_final_at"] == 0.5 and c["epoch_ratio"] == 3.0
    assert c["slow_reaches_fast_final_at"] is None and c["spread"] == pytest.approx(0.1)
    assert c["holds"] and c["verdict"].startswith("Holds")
    assert "3.0x fewer epochs" in c["verdict"] and "never reached" in c["verdict"]
    # the same gap but a seed spread larger than it: not shown
    noisy = _result([("fast", 0, [0.2, 0.4, 0.7]), ("fast", 1, [0.2, 0.4, 0.1]),
                     ("slow", 0, [0.0, 0.1, 0.2]), ("slow", 1, [0.0, 0.1, 0.2])])
    c = convergence_claim(noisy, "fast", "slow")
    assert not c["holds"] and c["verdict"].startswith("Not shown")
    # slow ends ahead: does not hold; both near zero: too early to tell
    c = convergence_claim(result, "slow", "fast")
    assert not c["holds"] and c["verdict"].startswith("Does not hold")
    tiny = _result([("fast", 0, [0.001, 0.002]), ("slow", 0, [0.0, 0.0])])
    assert "too early" in convergence_claim(tiny, "fast", "slow")["verdict"]
    # a baseline that never starts: the claim holds, but the ratio is only a bound
    idle = _result([("fast", 0, [0.05, 0.10]), ("slow", 0, [0.001, 0.004])])
    c = convergence_claim(idle, "fast", "slow")
    assert c["holds"] and c["first_eval"] == 0.5 and c["epoch_ratio"] == 2.0
    assert "has not started to detect" in c["verdict"] and "below 1 % AP" in c["verdict"]
    assert "the ratio is a lower bound" in c["verdict"]


def test_scale_claim_sets_the_gap_against_the_seed_spread():
    result = _result([("single", 0, [0.1, 0.20]), ("single", 1, [0.1, 0.22]),
                      ("multi", 0, [0.1, 0.30]), ("multi", 1, [0.1, 0.33])])
    c = scale_claim(result, "single", "multi")
    assert c["gap"] == pytest.approx(0.105) and c["spread"] == pytest.approx(0.03)
    assert c["holds"] and c["separated"] and c["verdict"].startswith("Holds")
    assert c["largest"] == "APs"              # all classes equal: the first wins the tie
    for run in result["runs"]:                # medium objects gain most: said so
        for e in run["evals"]:
            e["APm"] = e["AP"] * (3 if run["model"] == "multi" else 1)
    c = scale_claim(result, "single", "multi")
    assert c["holds"] and c["largest"] == "APm"
    assert "the gain is largest on APm, not on APs" in c["verdict"]
    close = _result([("single", 0, [0.20]), ("single", 1, [0.30]),
                     ("multi", 0, [0.22]), ("multi", 1, [0.31])])
    c = scale_claim(close, "single", "multi")
    assert not c["holds"] and "within the seed noise" in c["verdict"]
    with pytest.raises(ValueError, match="no runs of model 'multi'"):
        scale_claim(_result([("single", 0, [0.2])]), "single", "multi")


def test_a_longer_budget_keeps_the_drop_at_the_same_fraction():
    assert experiment_settings()["lr_drop"] == FULL["lr_drop"]
    longer = experiment_settings(steps=3 * FULL["steps"])       # 24 epochs: the drop after 21
    assert longer["lr_drop"] == 3 * FULL["lr_drop"] and "device" not in longer
    assert experiment_settings(steps=9000, lr_drop=6000)["lr_drop"] == 6000
    gpu = experiment_settings(device="cuda", steps=750, eval_every=375)
    assert gpu["device"] == "cuda" and gpu["lr_drop"] == 750       # whole evaluations
    assert experiment_settings(quick=True, steps=4)["lr_drop"] is None   # quick: no drop
    with pytest.raises(ValueError, match="multiple of eval_every"):
        experiment_settings(steps=1000)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        experiment_settings(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_the_experiment_on_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "convergence", "--device", "cuda", "--out", "results"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())          # nothing generated, nothing written
