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
    ("cpu", ["epochs=abc"], TypeError, "'epochs' expects a int .* got 'abc'"),
    ("cpu", ["amp=3"], TypeError, "'amp' expects a bool"),
    ("cpu", ["learning_rate=1"], ValueError, r"unknown config key\(s\) \['learning_rate'\]"),
    ("cpu", ["epochs"], ValueError, "key=value"),
    ("nope", None, ValueError, "unknown preset 'nope'"),
    ("missing.yaml", None, FileNotFoundError, "missing.yaml does not exist"),
])
def test_bad_config_is_named(preset, overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        get_config(preset, overrides)
