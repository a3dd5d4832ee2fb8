"""Stable Diffusion feature extractor (section 3.1): loading, shapes, v1.5 sizes, gradients."""
import copy
import math

import pytest
import torch

from diffsql_model.config import SDConfig
from diffsql_model.sd_features import DiffusionFeatureExtractor
from diffsql_model.sd_weights import SDFolderError, build_sd_modules, null_text_embedding
from diffsql_model.tiny_sd import build_tiny_sd_folder, build_tiny_unet, build_tiny_vae

# Tiny UNet widths per level are (16, 24, 32, 40): mid and up_blocks[0] run at 40, up_blocks[1] at 32.
TINY_TOKEN_CHANNELS = {"mid0": 40, "up0": 40, "up1": 32}
# Token grid at 192x640 (SD: latent 24x80, mid 3x10, up_blocks[0] 6x20, up_blocks[1] 12x40).
TOKEN_GRID = {"mid0": (3, 10), "up0": (6, 20), "up1": (12, 40)}


def tiny(layer="up0", **kw):
    torch.manual_seed(0)
    return DiffusionFeatureExtractor.from_config(
        SDConfig(enabled=True, arch="tiny", layer=layer, **kw)).eval()


def test_pretrained_folder_matches_in_memory_modules(tmp_path):
    modules = build_tiny_sd_folder(tmp_path)
    null = null_text_embedding(modules["text_encoder"], modules["tokenizer"])
    cfg = SDConfig(enabled=True, pretrained_path=str(tmp_path), layer="up1")
    ref = DiffusionFeatureExtractor(cfg, modules["vae"], modules["unet"], null).eval()
    loaded = DiffusionFeatureExtractor.from_config(cfg).eval()
    loaded.fusion.load_state_dict(ref.fusion.state_dict())
    # The empty prompt went through CLIP: not the zero fallback, same on both sides.
    assert loaded.null_text.shape == (1, 77, 32) and loaded.null_text.abs().min() > 0
    assert torch.equal(loaded.null_text, ref.null_text)
    x = torch.rand(1, 3, 192, 640)
    with torch.no_grad():
        a, b = ref(x), loaded(x)
        other = tiny("up1")  # other random SD weights, same fusion: must differ
        other.fusion.load_state_dict(ref.fusion.state_dict())
        c = other(x)
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["tokens"], b["tokens"])
    assert not torch.allclose(a["features"], c["features"], atol=1e-3)


def test_tiny_sd_dir_fixture_loads_on_any_layer(tiny_sd_dir):
    ext = DiffusionFeatureExtractor.from_config(
        SDConfig(enabled=True, pretrained_path=str(tiny_sd_dir), layer="mid0", channels=16))
    with torch.no_grad():
        out = ext(torch.rand(1, 3, 64, 64))
    assert out["features"].shape == (1, 16, 8, 8) and out["tokens"].shape == (1, 1, 40)


def test_fp16_only_folder_loads_as_float32(tmp_path):
    modules = build_tiny_sd_folder(tmp_path / "fp32")
    for name in ("vae", "unet", "text_encoder"):  # a copy downloaded with variant="fp16" only
        copy.deepcopy(modules[name]).half().save_pretrained(tmp_path / "fp16" / name, variant="fp16")
    modules["tokenizer"].save_pretrained(tmp_path / "fp16" / "tokenizer")
    assert not list((tmp_path / "fp16" / "unet").glob("diffusion_pytorch_model.safetensors"))
    exts = [DiffusionFeatureExtractor.from_config(
        SDConfig(enabled=True, pretrained_path=str(tmp_path / v))).eval() for v in ("fp32", "fp16")]
    exts[1].fusion.load_state_dict(exts[0].fusion.state_dict())
    assert all(p.dtype == torch.float32 for p in exts[1].parameters())
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        a, b = (e(x)["features"] for e in exts)
    assert torch.allclose(exts[0].null_text, exts[1].null_text, atol=1e-2)
    assert (a - b).abs().max() < 1e-2 * a.abs().max()


def test_folder_without_text_encoder_conditions_on_zeros(tmp_path, caplog):
    build_tiny_sd_folder(tmp_path, with_text_encoder=False)
    with caplog.at_level("WARNING"):
        ext = DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, pretrained_path=str(tmp_path)))
    assert "text_encoder" in caplog.text
    assert ext.null_text.shape == (1, 77, 32) and not ext.null_text.any()


def test_missing_or_broken_folder_gives_clear_error(tmp_path):
    with pytest.raises(SDFolderError, match="does not exist.*vae/.*unet/"):
        DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, pretrained_path=str(tmp_path / "nope")))
    build_tiny_vae().save_pretrained(tmp_path / "vae")
    with pytest.raises(SDFolderError, match=r"unet is missing"):
        DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, pretrained_path=str(tmp_path)))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(build_tiny_unet().to_json_string())
    with pytest.raises(SDFolderError, match=r"unet has no weights file"):
        DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, pretrained_path=str(tmp_path)))
    build_tiny_unet().save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    with pytest.raises(SDFolderError, match="could not load .*unet"):
        DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, pretrained_path=str(tmp_path)))


@pytest.mark.parametrize("layer", ["mid0", "up1", "up0"])
def test_output_shapes_any_size_every_layer(layer):
    ext = tiny(layer)
    assert ext.out_channels == 128 and ext.token_channels == TINY_TOKEN_CHANNELS[layer]
    gh, gw = TOKEN_GRID[layer]
    for b, h, w in [(2, 192, 640), (1, 190, 630)]:
        with torch.no_grad():
            out = ext(torch.rand(b, 3, h, w))
        assert out["features"].shape == (b, 128, math.ceil(h / 8), math.ceil(w / 8))
        assert out["tokens"].shape == (b, gh * gw, TINY_TOKEN_CHANNELS[layer])
        assert torch.isfinite(out["features"]).all() and torch.isfinite(out["tokens"]).all()


def test_padding_is_replicate_and_outputs_cropped():
    ext = tiny("up1")
    x = torch.rand(1, 3, 100, 130)  # padded to 128 x 192 inside
    x_pad = torch.nn.functional.pad(x, (0, 62, 0, 28), mode="replicate")
    with torch.no_grad():
        out, ref = ext(x), ext(x_pad)
    assert out["features"].shape == (1, 128, 13, 17)
    assert torch.allclose(out["features"], ref["features"][..., :13, :17], atol=1e-6)
    tok = ref["tokens"].transpose(1, 2).reshape(1, 32, 8, 12)[..., :7, :9]  # ceil(100/16), ceil(130/16)
    assert torch.allclose(out["tokens"], tok.flatten(2).transpose(1, 2), atol=1e-6)


def test_batch_items_are_independent_and_deepcopy_is_separate():
    ext = tiny("mid0")
    x = torch.rand(2, 3, 64, 128)
    dup = copy.deepcopy(ext)
    with torch.no_grad():
        both = ext(x)
        one = dup(x[1:])
    assert torch.allclose(both["features"][1:], one["features"], atol=1e-5)
    assert torch.allclose(both["tokens"][1:], one["tokens"], atol=1e-5)
    assert not ext._captured and not dup._captured  # each copy records into its own store


def test_v15_architecture_on_meta_matches_protocols():
    vae, unet = build_sd_modules("v1.5", device="meta")
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # "859.5 M"
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # "83.7 M"
    ext = DiffusionFeatureExtractor.from_config(SDConfig(enabled=True, arch="v1.5", layer="up0"),
                                                device="meta")
    assert ext.vae.config.scaling_factor == 0.18215 and ext.null_text.shape == (1, 77, 768)
    assert ext.token_channels == 1280 and ext.pad_multiple == 64
    shapes = {}

    def record(name):
        return lambda m, i, o: shapes.__setitem__(name, tuple((o[0] if isinstance(o, tuple) else o).shape[1:]))

    for i, blk in enumerate(ext.unet.down_blocks):
        blk.register_forward_hook(record(f"down{i}"))
    ext.unet.mid_block.register_forward_hook(record("mid"))
    for i, blk in enumerate(ext.unet.up_blocks):
        blk.register_forward_hook(record(f"up{i}"))
    out = ext(torch.empty(1, 3, 192, 640, device="meta"))  # shape inference only
    assert shapes == {  # PROTOCOLS.md: SD v1.5 UNet blocks at 192 x 640
        "down0": (320, 12, 40), "down1": (640, 6, 20), "down2": (1280, 3, 10),
        "down3": (1280, 3, 10), "mid": (1280, 3, 10), "up0": (1280, 6, 20),
        "up1": (1280, 12, 40), "up2": (640, 24, 80), "up3": (320, 24, 80)}
    assert out["features"].shape == (1, 128, 24, 80) and out["tokens"].shape == (1, 120, 1280)


def test_unet_sees_vae_mean_latent_timestep_and_null_text():
    ext = tiny("up0", timestep=1)
    seen = {}

    def grab(module, args, kwargs):
        seen.update(sample=args[0], t=args[1], cond=kwargs["encoder_hidden_states"])

    ext.unet.register_forward_pre_hook(grab, with_kwargs=True)
    x = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        first = ext(x)["features"]
        latent = ext.vae.encode(x * 2 - 1).latent_dist
        second = ext(x)["features"]
    assert ext.vae.config.scaling_factor == 0.18215
    assert torch.allclose(seen["sample"], latent.mean * 0.18215, atol=1e-6)
    assert not torch.allclose(seen["sample"], latent.sample() * 0.18215, atol=1e-3)
    assert torch.equal(first, second)  # no noise, no sampling: deterministic
    assert int(seen["t"]) == 1
    assert seen["cond"].shape == (2, 77, 32) and torch.equal(seen["cond"], ext.null_text.expand(2, -1, -1))
    late = tiny("up0", timestep=500)
    late.load_state_dict(ext.state_dict())
    with torch.no_grad():
        assert not torch.allclose(late(x)["features"], first, atol=1e-4)


def test_frozen_sd_gets_no_grad_fusion_does():
    ext = tiny("up0")
    ext.train()
    assert not ext.unet.training and not ext.vae.training and ext.fusion.training
    grad_mode = []
    ext.unet.register_forward_hook(lambda *_: grad_mode.append(torch.is_grad_enabled()))
    out = ext(torch.rand(1, 3, 64, 128))
    assert grad_mode == [False]  # frozen SD ran under no_grad: no activations kept
    out["features"].square().mean().backward()
    sd = list(ext.vae.parameters()) + list(ext.unet.parameters())
    assert all(not p.requires_grad and p.grad is None for p in sd)
    fusion = list(ext.fusion.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion)


def test_unfrozen_sd_gets_grads():
    ext = tiny("up0", frozen=False)
    ext.train()
    assert ext.unet.training
    out = ext(torch.rand(1, 3, 64, 128))
    (out["features"].square().mean() + out["tokens"].square().mean()).backward()
    for p in (ext.vae.encoder.conv_in.weight, ext.unet.down_blocks[0].resnets[0].conv1.weight,
              ext.unet.mid_block.attentions[0].proj_in.weight):
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0


def test_bf16_autocast():
    ext = tiny("up1")
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        ref = ext(x)["features"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ext(x)["features"]
    assert torch.isfinite(low).all()
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.1, err
