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
    flops = model_flops(model, 64, 64)
    assert flops > 0 and model.training
    assert all(p.requires_grad for p in model.parameters() if p.requires_grad is not None)
