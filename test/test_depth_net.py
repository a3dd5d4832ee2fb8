"""DiffSQLDepth end to end on CPU: every preset, gradients, encoder weights, checkpoints."""
import dataclasses
import importlib.util

import pytest
import torch
import torchvision

from diffsql_model.checkpoint import CheckpointError, load_model, save_checkpoint
from diffsql_model.decoder import UNetDecoder
from diffsql_model.depth_net import DiffSQLDepth
from diffsql_model.encoder import ResNetEncoder, imagenet_weights_path
from diffsql_model.presets import PRESETS, get_preset

HAVE_SD = importlib.util.find_spec("diffsql_model.sd_features") is not None
needs_sd = pytest.mark.skipif(not HAVE_SD, reason="diffsql_model/sd_features.py not present yet")


def cpu_preset(name, **kw):
    """The preset with no weights to fetch and the tiny SD in place of v1.5 (CPU tests)."""
    cfg = get_preset(name, weights="none", **kw)
    if cfg.sd.enabled:
        cfg = dataclasses.replace(cfg, sd=dataclasses.replace(cfg.sd, arch="tiny", pretrained_path=None))
    return cfg


def check_outputs(out, cfg, B, H, W):
    assert out["depth"].shape == (B, 1, H, W) and out["uncertainty"].shape == (B, 1, H, W)
    assert out["bin_centers"].shape == (B, cfg.num_bins)
    for v in out.values():
        assert torch.isfinite(v).all()
    d, c = out["depth"], out["bin_centers"]
    assert d.min() >= cfg.min_depth and d.max() <= cfg.max_depth
    assert (out["uncertainty"] >= 0).all()
    assert (c.diff(dim=1) > 0).all() and c.min() > cfg.min_depth and c.max() < cfg.max_depth


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_forward(name):
    cfg = cpu_preset(name)
    if cfg.sd.enabled and not HAVE_SD:
        pytest.skip("diffsql_model/sd_features.py not present yet")
    torch.manual_seed(0)
    model = DiffSQLDepth(cfg).eval()
    B = 1 if cfg.backbone == "resnet50" else 2
    with torch.no_grad():
        out = model(torch.rand(B, 3, 192, 640))
    check_outputs(out, cfg, B, 192, 640)
    if cfg.query_mode != "none":  # per-image bins: two different images, two different centre sets
        assert B == 1 or not torch.allclose(out["bin_centers"][0], out["bin_centers"][1])


def _backward_and_check(model, image):
    model.train()
    model(image)["depth"].mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient reaches {missing[:10]}"
    assert sum(p.grad.abs().sum() > 0 for p in trainable.values()) > 0.9 * len(trainable)
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("mode", ["dynamic", "fixed", "none"])
def test_gradients_reach_every_parameter_sd_off(mode):
    torch.manual_seed(0)
    model = DiffSQLDepth(get_preset("lite", query_mode=mode))
    frozen = _backward_and_check(model, torch.rand(2, 3, 64, 96))
    assert not frozen


@needs_sd
def test_gradients_with_frozen_sd():
    torch.manual_seed(0)
    model = DiffSQLDepth(get_preset("tiny_sd"))
    frozen = _backward_and_check(model, torch.rand(1, 3, 64, 96))
    sd_backbone = [(n, p) for n, p in model.sd.named_parameters() if "unet" in n or "vae" in n]
    assert sd_backbone and frozen >= {"sd." + n for n, _ in sd_backbone}
    assert all(p.grad is None for _, p in sd_backbone)


def test_any_input_size_padded_and_cropped():
    torch.manual_seed(0)
    cfg = get_preset("lite")
    model = DiffSQLDepth(cfg).eval()
    img = torch.rand(1, 3, 100, 130)
    with torch.no_grad():
        out = model(img)
        padded = model(torch.nn.functional.pad(img, (0, 30, 0, 28), mode="replicate"))
    check_outputs(out, cfg, 1, 100, 130)
    torch.testing.assert_close(out["depth"], padded["depth"][..., :100, :130])
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.rand(3, 64, 64))


def test_encoder_levels_and_normalisation():
    torch.manual_seed(0)
    enc = ResNetEncoder("resnet18").eval()
    img = torch.rand(1, 3, 64, 96)
    feats = enc(img)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 48), (64, 16, 24), (128, 8, 12), (256, 4, 6), (512, 2, 3)]
    ref = torchvision.models.resnet18()
    ref.load_state_dict({k: v for k, v in enc.state_dict().items()}, strict=False)
    ref.eval()
    x = torchvision.transforms.functional.normalize(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        expect = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
    torch.testing.assert_close(feats[4], expect)
    assert ResNetEncoder("resnet50").num_ch_enc == [64, 256, 512, 1024, 2048]


def test_encoder_weights_from_file_and_cache(tmp_path, monkeypatch):
    torch.manual_seed(3)
    src = torchvision.models.resnet18()
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    enc = ResNetEncoder("resnet18", str(tmp_path / "r18.pth"))
    torch.testing.assert_close(enc.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    expected = tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet18") == expected
    with pytest.raises(FileNotFoundError) as e:
        ResNetEncoder("resnet18", "imagenet")
    assert str(expected) in str(e.value) and "never downloads" in str(e.value)
    expected.parent.mkdir(parents=True)
    torch.save(src.state_dict(), expected)
    enc = ResNetEncoder("resnet18", "imagenet")
    torch.testing.assert_close(enc.conv1.weight, src.conv1.weight)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ResNetEncoder("resnet18", str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="do not fit resnet50"):
        ResNetEncoder("resnet50", str(tmp_path / "r18.pth"))


def test_decoder_fuses_sd_features_at_one_sixteenth():
    torch.manual_seed(0)
    feats = ResNetEncoder("resnet18")(torch.rand(1, 3, 64, 96))
    dec = UNetDecoder([64, 64, 128, 256, 512], model_dim=8, sd_channels=5)
    sd = torch.rand(1, 5, 8, 12)  # H/8
    S = dec(feats, sd)
    assert S.shape == (1, 8, 32, 48)
    assert dec.fuse_convs[0].conv.in_channels == 256 + 256 + 5  # upsampled 1/32 + 1/16 skip + SD
    assert not torch.allclose(S, dec(feats, sd + 1))
    with pytest.raises(ValueError, match="SD features"):
        dec(feats, None)


@pytest.fixture
def lite_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("lite", max_depth=50.0)
    model = DiffSQLDepth(cfg).eval()
    path = save_checkpoint(tmp_path / "ckpt.pt", {"model_config": cfg.to_dict(), "model": model.state_dict()})
    return path, model, cfg


def test_checkpoint_round_trip(lite_checkpoint):
    path, model, cfg = lite_checkpoint
    loaded, loaded_cfg = load_model(path, "cpu")
    assert loaded_cfg == cfg and not loaded.training
    img = torch.rand(1, 3, 96, 160)
    with torch.no_grad():
        a, b = model(img), loaded(img)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_checkpoint_errors(lite_checkpoint, tmp_path):
    path, model, cfg = lite_checkpoint
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 100)
    for bad in ("trunc.pt", "garbage.pt", "missing.pt"):
        with pytest.raises(CheckpointError, match=bad):
            load_model(tmp_path / bad)
    other = get_preset("lite", num_bins=16)  # stored weights for D=32 planes, config says 16
    save_checkpoint(tmp_path / "mismatch.pt", {"model_config": other.to_dict(), "model": model.state_dict()})
    with pytest.raises(CheckpointError, match="mismatch.pt.*do not fit"):
        load_model(tmp_path / "mismatch.pt")
    bad_cfg = dict(cfg.to_dict(), backbone="vgg16")
    save_checkpoint(tmp_path / "badcfg.pt", {"model_config": bad_cfg, "model": model.state_dict()})
    with pytest.raises(CheckpointError, match="model_config is invalid.*vgg16"):
        load_model(tmp_path / "badcfg.pt")
    state = model.state_dict()
    state.pop("query_layer.q_base")
    save_checkpoint(tmp_path / "missing_key.pt", {"model_config": cfg.to_dict(), "model": state})
    with pytest.raises(CheckpointError, match="q_base"):
        load_model(tmp_path / "missing_key.pt")


def test_load_model_never_fetches_imagenet(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    cfg = get_preset("r18", model_dim=8, num_queries=4, num_bins=8)  # weights="imagenet"
    model = DiffSQLDepth(dataclasses.replace(cfg, weights="none"))
    save_checkpoint(tmp_path / "r18.pt", {"model_config": cfg.to_dict(), "model": model.state_dict()})
    loaded, loaded_cfg = load_model(tmp_path / "r18.pt")
    assert loaded_cfg.weights == "imagenet"
    torch.testing.assert_close(loaded.encoder.conv1.weight, model.encoder.conv1.weight)


@needs_sd
def test_checkpoint_round_trip_with_sd(tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("tiny_sd")
    model = DiffSQLDepth(cfg).eval()
    save_checkpoint(tmp_path / "sd.pt", {"model_config": cfg.to_dict(), "model": model.state_dict()})
    loaded, loaded_cfg = load_model(tmp_path / "sd.pt")
    img = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        a, b = model(img), loaded(img)
    assert loaded_cfg == cfg and all(torch.equal(a[k], b[k]) for k in a)


def test_export_program_matches_eager(tmp_path):
    from diffsql_model.export import ExportError, export_depth_net, load_exported

    torch.manual_seed(0)
    cfg = get_preset("lite", num_bins=16)
    model = DiffSQLDepth(cfg).eval()
    export_depth_net(model, cfg, tmp_path / "m.pt2", height=64, width=96)
    program, loaded_cfg = load_exported(tmp_path / "m.pt2")
    img = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        a, b = model(img), program(img)
    assert loaded_cfg == cfg
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)
    (tmp_path / "bad.pt2").write_bytes(b"junk")
    with pytest.raises(ExportError, match="bad.pt2"):
        load_exported(tmp_path / "bad.pt2")
    # A config that does not describe the model (SD on, the model has none) is refused; SD
    # models themselves export (test_export.py).
    with pytest.raises(ExportError, match="SD features"):
        export_depth_net(model, get_preset("tiny_sd"), tmp_path / "sd.pt2")


@needs_sd
@pytest.mark.slow
def test_paper_model_v15_architecture():
    """The full diffsql_r50 (SD v1.5 architecture, random weights): sizes from PROTOCOLS.md."""
    torch.manual_seed(0)
    cfg = get_preset("diffsql_r50", weights="none", sd={"allow_random_weights": True})
    model = DiffSQLDepth(cfg).eval()
    unet_m = sum(p.numel() for p in model.sd.unet.parameters()) / 1e6
    assert abs(unet_m - 859.5) < 0.1
    assert all(not p.requires_grad for p in model.sd.unet.parameters())
    img = torch.rand(1, 3, 192, 640)
    with torch.no_grad():
        sd = model.sd(img)
        out = model(img)
    assert sd["tokens"].shape == (1, 6 * 20, 1280)  # up block 0: 1280 @ 6 x 20
    assert sd["features"].shape == (1, cfg.sd.channels, 24, 80)
    check_outputs(out, cfg, 1, 192, 640)


@needs_sd
def test_load_model_does_not_need_the_sd_folder(tmp_path):
    """SD weights travel in the checkpoint: the robot needs no diffusers folder to load it."""
    import shutil

    from diffsql_model.tiny_sd import build_tiny_sd_folder

    build_tiny_sd_folder(tmp_path / "sd", with_text_encoder=True)
    torch.manual_seed(0)
    cfg = get_preset("tiny_sd", sd={"pretrained_path": str(tmp_path / "sd")})
    model = DiffSQLDepth(cfg).eval()
    save_checkpoint(tmp_path / "c.pt", {"model_config": cfg.to_dict(), "model": model.state_dict()})
    shutil.rmtree(tmp_path / "sd")
    loaded, loaded_cfg = load_model(tmp_path / "c.pt")
    assert loaded_cfg.sd.pretrained_path == str(tmp_path / "sd")
    img = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        a, b = model(img), loaded(img)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(loaded.sd.null_text, torch.zeros_like(loaded.sd.null_text))  # CLIP's, kept
