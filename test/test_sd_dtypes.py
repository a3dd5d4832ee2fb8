"""The SD path in reduced precision, reproduced on the CPU: the VAE never runs in fp16, frozen SD
weights are kept in the run dtype (autocast never re-casts them), the timestep lives on the
device, every trainable SD parameter gets a gradient, and a full-size SD without weights is a
config error before anything is read."""
from __future__ import annotations

import pytest
import torch

from diffsql_model.config import SDConfig
from diffsql_model.sd_features import DiffusionFeatureExtractor
from diffsql_model.train.cli import main as train_main
from diffsql_model.train.config import ModelSection, resolve_model_config
from diffsql_model.yaml_config import ConfigError

from conftest import ROOT


def tiny(**kw):
    torch.manual_seed(0)
    return DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, arch="tiny", **kw)).eval()


def overflowing(ext):
    """Scale the VAE's first conv so its activations exceed fp16's range (65504) but not fp32's:
    what the real SD VAE's activations do on bright images in fp16."""
    conv = ext.vae.encoder.conv_in
    with torch.no_grad():  # weights still representable in fp16, their sums over 27 inputs not
        scale = 0.9 * 65504 / conv.weight.abs().max()
        conv.weight.mul_(scale)
        conv.bias.mul_(scale)
    return ext


def test_vae_encodes_in_fp32_under_fp16_autocast():
    ext = overflowing(tiny())
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        ref = ext.encode_latent(x)
        with torch.autocast("cpu", dtype=torch.float16):
            # The defect reproduced: the same encoder under the caller's fp16 autocast overflows.
            raw = ext.vae.encode(x * 2 - 1).latent_dist.mean
            latent = ext.encode_latent(x)
            out = ext(x)
    assert not torch.isfinite(raw).all()
    assert torch.isfinite(ref).all() and ref.abs().max() > 0
    assert latent.dtype == torch.float32 and torch.isfinite(latent).all()
    torch.testing.assert_close(latent, ref, rtol=0, atol=0)
    assert torch.isfinite(out["features"]).all() and torch.isfinite(out["tokens"]).all()


@pytest.mark.parametrize("precision, vae, unet", [("fp32", torch.float32, torch.float32),
                                                  ("bf16", torch.bfloat16, torch.bfloat16),
                                                  ("fp16", torch.float32, torch.float16)])
def test_frozen_sd_is_kept_in_the_run_dtype(precision, vae, unet, tiny_sd_dir):
    for cfg in (SDConfig(enabled=True, arch="tiny"),
                SDConfig(enabled=True, pretrained_path=str(tiny_sd_dir))):
        torch.manual_seed(0)
        ext = DiffusionFeatureExtractor.from_config(cfg, "cpu", precision)
        assert {p.dtype for p in ext.vae.parameters()} == {vae}
        assert {p.dtype for p in ext.unet.parameters()} == {unet}
        assert ext.null_text.dtype == unet
        assert {p.dtype for p in ext.fusion.parameters()} == {torch.float32}  # trained: fp32


def test_bf16_sd_under_autocast_matches_fp32_and_feeds_the_fusion_its_dtype():
    ref_ext = tiny()
    torch.manual_seed(0)
    low_ext = DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, arch="tiny"), None, "bf16").eval()
    low_ext.fusion.load_state_dict(ref_ext.fusion.state_dict())
    assert low_ext.weights_seed == ref_ext.weights_seed  # same draw: same SD weights, other dtype
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        ref = ref_ext(x)
        without_autocast = low_ext(x)  # validation runs the model without autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = low_ext(x)
    assert low["tokens"].dtype == torch.bfloat16 and without_autocast["tokens"].dtype == torch.float32
    for out in (low, without_autocast):
        for key in ("features", "tokens"):
            err = (out[key].float() - ref[key]).abs().max() / ref[key].abs().max()
            assert torch.isfinite(out[key]).all() and err < 0.1, (key, err)


def test_timestep_is_a_device_buffer_outside_the_state_dict():
    ext = tiny(timestep=7)
    assert isinstance(ext.timestep, torch.Tensor) and ext.timestep.dtype == torch.long
    assert int(ext.timestep) == 7 and "timestep" in dict(ext.named_buffers())
    assert "timestep" not in ext.state_dict()
    meta = DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, arch="tiny"), "meta")
    assert meta.timestep.device.type == "meta"


def test_unfrozen_sd_gives_every_parameter_a_gradient():
    ext = tiny(frozen=False).train()
    assert isinstance(ext.unet.conv_out, torch.nn.Identity) and ext.unet.conv_norm_out is None
    out = ext(torch.rand(1, 3, 64, 128))
    (out["features"].square().mean() + out["tokens"].square().mean()).backward()
    params = list(ext.vae.named_parameters()) + list(ext.unet.named_parameters())
    assert [n for n, p in params if p.grad is None] == []  # DDP needs every one


def test_full_size_sd_without_weights_is_a_config_error_naming_pretrained_path():
    with pytest.raises(ConfigError, match="sd.pretrained_path"):
        resolve_model_config(ModelSection(preset="diffsql_r50"))
    with pytest.raises(ConfigError, match="sd.pretrained_path"):
        DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, arch="v1.5"))
    ok = resolve_model_config(ModelSection(preset="diffsql_r50", overrides={"sd": {"allow_random_weights": True}}))
    assert ok.sd.allow_random_weights and ok.sd.arch == "v1.5"
    assert resolve_model_config(ModelSection(preset="tiny_sd")).sd.arch == "tiny"  # tests' arch


def test_paper_config_refuses_random_sd_before_reading_data(tmp_path, capsys):
    config = ROOT / "config/train/kitti_diffsql_r50_m.yaml"
    missing = tmp_path / "no_kitti_here"
    code = train_main(["--config", str(config), "--out", str(tmp_path / "out"),
                       "--set", f"data.root={missing}"])
    err = capsys.readouterr().err
    assert code == 2 and "sd.pretrained_path" in err and "allow_random_weights" in err
    assert str(missing) not in err and not (tmp_path / "out").exists()
