"""Presets build, overrides are typed, and mistakes are named."""
import pytest

from ddetr.config import PRESETS, get_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    assert get_config(name) is not None


def test_overrides_are_converted_to_the_field_type():
    cfg = get_config("cpu", ["lr_backbone=2e-4", "epochs=3", "train_scales=[128, 160]",
                             "two_stage=true", "backbone_weights=/some/resnet.pth"])
    assert cfg.lr_backbone == 2e-4 and isinstance(cfg.lr_backbone, float)
    assert cfg.epochs == 3 and cfg.train_scales == [128, 160] and cfg.two_stage is True
    assert cfg.backbone_weights == "/some/resnet.pth"


def test_yaml_file_with_base_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: paper\nnum_queries: 100\nlr: 1e-4\n")
    cfg = get_config(str(path))
    assert cfg.num_queries == 100 and cfg.lr == 1e-4 and cfg.backbone == "resnet50"


@pytest.mark.parametrize("preset, overrides, error, pattern", [
    ("cpu", ["epochs=abc"], TypeError, "'epochs' expects an int .* got 'abc'"),
    ("cpu", ["amp=3"], TypeError, "'amp' expects a bool"),
    ("cpu", ["learning_rate=1"], ValueError, r"unknown config key\(s\) \['learning_rate'\]"),
    ("cpu", ["epochs"], ValueError, "key=value"),
    ("nope", None, ValueError, "unknown preset 'nope'"),
    ("missing.yaml", None, FileNotFoundError, "missing.yaml does not exist"),
])
def test_bad_config_is_named(preset, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        get_config(preset, overrides)


def test_defaults_are_the_paper_everywhere():
    from ddetr.config import Config
    assert Config() == get_config() == get_config("paper")
    assert Config().backbone == "resnet50" and Config().num_queries == 300


# every check names the key it is about: (overrides on the cpu preset, error, the key)
BAD = [
    (["lr=0"], "'lr' expects > 0"),
    (["lr=-1e-4"], "'lr' expects > 0"),
    (["lr=nan"], "'lr' expects a finite number"),
    (["lr_backbone=-1"], "'lr_backbone' expects >= 0"),
    (["batch_size=0"], "'batch_size' expects >= 1"),
    (["epochs=0"], "'epochs' expects >= 1"),
    (["lr_drop=0"], "'lr_drop' expects >= 1"),
    (["eval_every=-1"], "'eval_every' expects >= 0"),
    (["dropout=1.0"], r"'dropout' expects a value in \[0, 1\)"),
    (["dropout=-0.1"], r"'dropout' expects a value in \[0, 1\)"),
    (["num_feature_levels=0"], "'num_feature_levels' expects 1"),
    (["num_feature_levels=2"], "'num_feature_levels' expects 1"),
    (["num_feature_levels=5"], "'num_feature_levels' expects 1"),
    (["enc_n_points=0"], "'enc_n_points' expects >= 1"),
    (["dec_n_points=0"], "'dec_n_points' expects >= 1"),
    (["num_queries=0"], "'num_queries' expects >= 1"),
    (["num_classes=0"], "'num_classes' expects >= 1"),
    (["enc_layers=0"], "'enc_layers' expects >= 1"),
    (["dec_layers=-1"], "'dec_layers' expects >= 1"),
    (["dim_feedforward=0"], "'dim_feedforward' expects >= 1"),
    (["val_scale=0"], "'val_scale' expects >= 1"),
    (["train_scales=[]"], "'train_scales' expects a non-empty list"),
    (["train_scales=[256, -1]"], "'train_scales' expects a non-empty list"),
    (["time_limit_min=-5"], "'time_limit_min' expects >= 0"),
    (["num_workers=-1"], "'num_workers' expects >= 0"),
    (["synthetic_image_size=8"], "'synthetic_image_size' expects >= 32"),
    (["d_model=100"], "'d_model', 'n_heads': d_model=100 must be divisible by n_heads=8"),
    (["n_heads=3"], "'d_model', 'n_heads'"),
    (["d_model=48", "n_heads=4"], "key 'd_model': d_model=48 must be divisible by 32"),
    (["query_anchors=dab", "two_stage=false", "with_box_refine=false"],
     "'query_anchors', 'with_box_refine'"),
    (["query_anchors=dab"], "'query_anchors', 'two_stage'"),
    (["architecture=detr"], "'architecture', 'num_feature_levels', 'with_box_refine', "
                            "'two_stage'"),
    (["architecture=detr", "num_feature_levels=1", "two_stage=false"],
     "'architecture', 'with_box_refine'"),
    (["architecture=yolo"], "'architecture' expects one of"),
    (["backbone=vgg16"], "'backbone' expects one of"),
    (["backbone_norm=layer_norm"], "'backbone_norm' expects one of"),
    (["dataset=voc"], "'dataset' expects one of"),
    (["attention_backend=fast"], "'attention_backend' expects one of"),
    (["query_anchors=anchor"], "'query_anchors' expects one of"),
    (["attention=sparse"], r"'attention' expects one of \['deformable', 'dense'\], got 'sparse'"),
    (["architecture=detr", "num_feature_levels=1", "two_stage=false",
      "with_box_refine=false", "attention=dense"], "'architecture', 'attention'"),
    (["device=gpu"], "'device' expects 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["device=cuda:x"], "'device' expects"),
    (["dilation=true"], "'dilation', 'backbone': dilation=true needs a ResNet"),
    (["set_cost_class=0", "set_cost_bbox=0", "set_cost_giou=0"], "'set_cost_class'"),
    (["data_path="], "'data_path' expects a str"),
    (["lr="], "'lr' expects a float"),
    (["backbone_weights=3"], "'backbone_weights' expects a path"),
    (["lr=[1,"], r"override 'lr=\[1,': '\[1,' is not a YAML value"),
]


@pytest.mark.parametrize("overrides, pattern", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_every_check_names_the_key(overrides, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        get_config("cpu", overrides)


def test_a_config_is_checked_however_it_is_made():
    import dataclasses

    from ddetr.config import Config
    with pytest.raises(ValueError, match="'batch_size' expects >= 1"):
        Config(batch_size=0)
    with pytest.raises(ValueError, match="'lr' expects > 0"):
        dataclasses.replace(get_config("cpu"), lr=0.0)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: cpu\nepochs: 3\nlr: [1e-4\nbatch_size: 2\n")
    with pytest.raises(ValueError, match=r"run.yaml, line \d+, column \d+: "):
        get_config(str(path))
    path.write_text("- epochs: 3\n")
    with pytest.raises(ValueError, match="run.yaml must hold a mapping of keys, got a list"):
        get_config(str(path))
    path.write_text("preset: cpu\nepoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['epoch'\] in config "
                                         r"file .*run.yaml"):
        get_config(str(path))
    path.write_text("preset: cpu\nbatch_size: 0\n")
    with pytest.raises(ValueError, match="'batch_size' expects >= 1"):
        get_config(str(path))
