"""The paper's tables as data (ddetr.experiments.convergence) and their text form."""
from ddetr.experiments.convergence import PAPER, PAPER_TABLE1, PAPER_TABLE2
from ddetr.experiments.results import paper_table1_text, paper_table2_text, scale_gains


def test_paper_tables_are_consistent():
    deformable = next(r for r in PAPER_TABLE1["rows"] if r["method"] == "Deformable DETR")
    full = PAPER_TABLE2["rows"][3]       # MS inputs + MS attention, K=4, w/o FPN
    assert (deformable["AP"], deformable["APs"]) == (full["AP"], full["APs"]) == (43.8, 26.4)
    single, multi = PAPER["scales"]
    assert multi["AP"] == full["AP"] and single["table"] == "Table 2"
    assert "not the paper" in PAPER["repository_scales"]["source"]


def test_text_tables_and_gains():
    assert len(paper_table1_text(PAPER_TABLE1)) == len(PAPER_TABLE1["rows"]) + 1
    lines = paper_table2_text(PAPER_TABLE2)
    assert "+1.7, +2.9" in lines[2]      # multi-scale inputs, as the paper's text says
    gains = scale_gains(*PAPER["scales"])
    assert round(gains["AP"], 1) == 4.1 and round(gains["APs"], 1) == 5.2
    assert scale_gains({"AP": 1.0, "APs": None}, {"AP": 2.0, "APs": 1.0}) == {"AP": 1.0}


def test_model_flops_restores_the_model():
    from ddetr.analysis.flops import model_flops
    from ddetr.config import get_config
    from ddetr.models import build_model
    model = build_model(get_config("cpu"))[0].train()
    model.backbone.requires_grad_(False)          # a mix of frozen and trained parameters
    flags = [p.requires_grad for p in model.parameters()]
    assert any(flags) and not all(flags)
    flops = model_flops(model, 64, 64)
    assert flops > 0 and model.training
    assert [p.requires_grad for p in model.parameters()] == flags


def test_model_flops_adds_the_sampling_of_every_deformable_call():
    """with_sampling adds 10 Lq L K C per MSDeformAttn call, counted from the calls the
    model made: the encoder's S tokens per layer and the decoder's queries per layer."""
    from ddetr.analysis.flops import model_flops
    from ddetr.config import get_config
    from ddetr.models import build_model
    cfg = get_config("cpu", {"two_stage": False, "dn_detr": False})
    model = build_model(cfg)[0]
    plain, plain_ops = model_flops(model, 64, 64, by_op=True)
    total, ops = model_flops(model, 64, 64, with_sampling=True, by_op=True)
    S = sum((64 // s) ** 2 for s in (8, 16, 32, 64))             # 64x64: 8x8 ... 1x1
    L, K, C = cfg.num_feature_levels, cfg.enc_n_points, cfg.d_model
    expected = 10 * L * K * C * (cfg.enc_layers * S + cfg.dec_layers * cfg.num_queries)
    assert "bilinear sampling" not in plain_ops and total == plain + expected
    assert ops["bilinear sampling"] == expected and model_flops(model, 64, 64) == plain


def test_table3_rows():
    from ddetr.experiments.convergence import PAPER_TABLE3
    from ddetr.experiments.results import paper_table3_text
    ours = [r for r in PAPER_TABLE3["rows"] if r["method"] == "Deformable DETR"]
    assert [r["AP"] for r in ours] == [46.9, 48.7, 49.0, 50.1, 52.3]   # Section 5.3's text
    assert [r["tta"] for r in ours] == [False] * 4 + [True]
    lines = paper_table3_text(PAPER_TABLE3)
    assert len(lines) == 10 and lines[4].split()[-3:] == ["-", "-", "-"]


def test_followups_table_names_every_paper_its_sources_and_real_switches():
    """Every follow-up has results with epochs, AP and a source naming a table (or the
    abstract / release notes it comes from); every `key=value` and preset a switch names
    is a real ddetr.config override."""
    import ast
    import re
    from ddetr.config import get_config
    from ddetr.experiments.followups import (DEFORMABLE_DETR, FOLLOWUPS, followups_html,
                                             followups_markdown)
    names = [r["name"] for r in FOLLOWUPS]
    assert names == ["SMCA", "Conditional DETR", "Anchor DETR", "DAB-DETR", "SAM-DETR",
                     "DN-DETR", "DINO", "H-DETR", "RT-DETR"]
    for record in [DEFORMABLE_DETR, *FOLLOWUPS]:
        assert record["why"][0] and record["why"][1] and record["changes"]
        for result in record["results"]:
            assert result["epochs"] > 0 and 30 < result["AP"] < 60
            assert re.search(r"Table \d|abstract|release notes", result["source"]), result
        for preset in re.findall(r"`(paper\w*)`", record["switch"] or ""):
            get_config(preset)
        overrides = {k: ast.literal_eval(v) for k, v in
                     re.findall(r"`(\w+)=([^`]+)`", record["switch"] or "")}
        if overrides:
            get_config("paper", overrides)
    dab = next(r for r in FOLLOWUPS if r["name"] == "DAB-DETR")
    assert 'query_anchors="dab"' in dab["switch"]
    text = followups_markdown()
    assert text.count("\n") == len(FOLLOWUPS) + 2 and "Table 5, row 4" in text
    html = followups_html()
    assert html.count("<tr>") == len(FOLLOWUPS) + 2 and "<code>query_anchors" in html
