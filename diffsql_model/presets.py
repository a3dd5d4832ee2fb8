"""Named model configurations: the paper's full model, its ablations (Tables 4-6), CPU sizes.

`python -m diffsql_model.presets [folder]` writes config/model/<name>.yaml for every preset
(a test checks the files match).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Callable

from .config import ModelConfig, SDConfig
from .yaml_config import ConfigError


def _diffsql_r50() -> ModelConfig:
    # Paper's full model: ImageNet ResNet-50 + SD v1.5 features, up-block-0 tokens, dynamic queries.
    return ModelConfig(backbone="resnet50", weights="imagenet", query_mode="dynamic",
                       sd=SDConfig(enabled=True, arch="v1.5", layer="up0"))


def _with(base: Callable[[], ModelConfig], sd: dict | None = None, **changes) -> Callable[[], ModelConfig]:
    """A factory: `base()` with top-level fields `changes` and SDConfig fields `sd` replaced."""
    def make() -> ModelConfig:
        cfg = base()
        return dataclasses.replace(cfg, **changes, sd=dataclasses.replace(cfg.sd, **(sd or {})))
    return make


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "diffsql_r50": _diffsql_r50,
    "diffsql_r18": _with(_diffsql_r50, backbone="resnet18"),
    # Table 4: ResNet alone (SD off: coarse tokens come from patch-embedding S, as in SQLdepth).
    "r50": _with(_diffsql_r50, sd={"enabled": False}),
    "r18": _with(_diffsql_r50, backbone="resnet18", sd={"enabled": False}),
    # Table 5: which SD block provides the coarse tokens H.
    "sd_mid0": _with(_diffsql_r50, sd={"layer": "mid0"}),
    "sd_up1": _with(_diffsql_r50, sd={"layer": "up1"}),
    # Table 6: query mechanism.
    "queries_none": _with(_diffsql_r50, query_mode="none"),
    "queries_fixed": _with(_diffsql_r50, query_mode="fixed"),
    # Small, random-init models that run on a CPU (robot without GPU, tests, smoke training).
    "lite": lambda: ModelConfig(backbone="resnet18", weights="none", model_dim=16, num_queries=16,
                                num_bins=32, patch_size=16, sd=SDConfig(enabled=False)),
    "tiny_sd": lambda: ModelConfig(backbone="resnet18", weights="none", model_dim=16, num_queries=16,
                                   num_bins=32, patch_size=16,
                                   sd=SDConfig(enabled=True, arch="tiny", layer="up0", channels=32)),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """The preset's ModelConfig with top-level fields replaced by `overrides`; `sd=` takes a
    dict of SDConfig fields (or an SDConfig). Result re-validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]()
    if not overrides:
        return cfg
    data = cfg.to_dict()
    sd = overrides.pop("sd", None)
    if sd is not None:
        data["sd"].update(sd.to_dict() if isinstance(sd, SDConfig) else sd)
    unknown = set(overrides) - set(data)
    if unknown:
        raise ConfigError(f"unknown ModelConfig field(s) {sorted(unknown)}; known: {sorted(data)}")
    data.update(overrides)
    return ModelConfig.from_dict(data)


def write_preset_yamls(folder: str | pathlib.Path) -> list[pathlib.Path]:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PRESETS:
        path = folder / f"{name}.yaml"
        get_preset(name).save_yaml(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[1] / "config" / "model"
    for p in write_preset_yamls(out):
        print(p)
