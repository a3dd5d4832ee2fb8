"""Model presets: paper configurations, YAML files in config/model, overrides, clear errors."""
import pytest

from diffsql_model.config import ModelConfig
from diffsql_model.presets import PRESETS, get_preset
from diffsql_model.yaml_config import ConfigError

from conftest import ROOT

EXPECTED = {
    "diffsql_r50", "diffsql_r18", "r50", "r18", "lite", "sd_mid0", "sd_up1",
    "queries_none", "queries_fixed", "tiny_sd",
}


def _diff(a: ModelConfig, b: ModelConfig) -> dict:
    """Flattened fields where two configs differ."""
    da, db = a.to_dict(), b.to_dict()
    out = {k: (da[k], db[k]) for k in da if k != "sd" and da[k] != db[k]}
    out.update({f"sd.{k}": (da["sd"][k], db["sd"][k]) for k in da["sd"] if da["sd"][k] != db["sd"][k]})
    return out


def test_preset_names():
    assert set(PRESETS) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_file_equals_preset(name):
    path = ROOT / "config" / "model" / f"{name}.yaml"
    assert path.is_file(), f"{path} missing: run python -m diffsql_model.presets"
    assert ModelConfig.load_yaml(path) == get_preset(name)


def test_yaml_round_trip(tmp_path):
    for name in EXPECTED:
        cfg = get_preset(name)
        cfg.save_yaml(tmp_path / "m.yaml")
        back = ModelConfig.load_yaml(tmp_path / "m.yaml")
        assert back == cfg and back.sd == cfg.sd and isinstance(back.max_depth, float)


def test_paper_model_and_ablations_differ_in_one_thing():
    full = get_preset("diffsql_r50")
    assert (full.backbone, full.weights, full.query_mode) == ("resnet50", "imagenet", "dynamic")
    assert (full.sd.enabled, full.sd.arch, full.sd.layer, full.sd.timestep) == (True, "v1.5", "up0", 1)
    assert _diff(full, get_preset("diffsql_r18")) == {"backbone": ("resnet50", "resnet18")}
    assert _diff(full, get_preset("r50")) == {"sd.enabled": (True, False)}
    assert _diff(full, get_preset("r18")) == {"backbone": ("resnet50", "resnet18"), "sd.enabled": (True, False)}
    assert _diff(full, get_preset("sd_mid0")) == {"sd.layer": ("up0", "mid0")}
    assert _diff(full, get_preset("sd_up1")) == {"sd.layer": ("up0", "up1")}
    assert _diff(full, get_preset("queries_none")) == {"query_mode": ("dynamic", "none")}
    assert _diff(full, get_preset("queries_fixed")) == {"query_mode": ("dynamic", "fixed")}
    for cpu in ("lite", "tiny_sd"):  # run anywhere: no weights to fetch
        assert get_preset(cpu).weights == "none" and get_preset(cpu).backbone == "resnet18"
    assert get_preset("tiny_sd").sd.arch == "tiny" and get_preset("tiny_sd").sd.enabled
    assert not get_preset("lite").sd.enabled


def test_factories_return_fresh_objects():
    a = get_preset("diffsql_r50")
    a.sd.layer = "mid0"
    assert get_preset("diffsql_r50").sd.layer == "up0"


def test_overrides():
    cfg = get_preset("diffsql_r50", weights="none", max_depth=100, sd={"arch": "tiny"})
    assert (cfg.weights, cfg.max_depth, cfg.sd.arch, cfg.sd.layer) == ("none", 100.0, "tiny", "up0")
    with pytest.raises(ConfigError, match="num_querys"):
        get_preset("lite", num_querys=3)
    with pytest.raises(ConfigError, match="query_mode"):
        get_preset("lite", query_mode="sometimes")
    with pytest.raises(ConfigError, match="sd.layer"):
        get_preset("tiny_sd", sd={"layer": "up7"})


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError) as e:
        get_preset("diffsql_r101")
    msg = str(e.value)
    assert "diffsql_r101" in msg and all(n in msg for n in EXPECTED)

