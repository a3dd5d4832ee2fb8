"""Dynamic Self-Query Layer against the paper's equations, recomputed here with plain tensor ops."""
import math

import pytest
import torch

from diffsql_model.query_layer import DynamicSelfQueryLayer, bin_centers_from_widths

E, K, D = 8, 5, 7  # model_dim, queries, bins


def _layer(mode, token_channels=0, seed=0):
    torch.manual_seed(seed)
    layer = DynamicSelfQueryLayer(E, K, D, 0.5, 20.0, query_mode=mode, token_channels=token_channels,
                                  patch_size=4).double()
    with torch.no_grad():  # non-trivial values everywhere (default init leaves q_base tiny)
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def _layer_norm(x, m):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance)."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias


def _reference(layer, S, H):
    """Eqs. 1-11 written out from the paper (with the documented 1/sqrt(C) in Eq. 4, 1/sqrt(E) in Eq. 7
    and LayerNorm on Q and S before Eq. 7)."""
    lin = lambda x, m: x @ m.weight.T + m.bias  # noqa: E731
    g = H.sum(dim=1) / H.shape[1]  # Eq. 1
    q_dyn = layer.q_base[None].repeat(H.shape[0], 1, 1)  # Q_base, B x K x C
    if layer.query_mode == "dynamic":
        q_dyn = q_dyn + lin(g, layer.f_adjust)[:, None]  # Eqs. 2-3
    A = torch.einsum("bkc,blc->bkl", q_dyn, H) / math.sqrt(H.shape[-1])  # Eq. 4
    A = A.exp() / A.exp().sum(dim=-1, keepdim=True)  # Eq. 5
    q_out = torch.einsum("bkl,blc->bkc", A, H)  # Eq. 6
    Q = _layer_norm(lin(q_out, layer.query_proj), layer.norm_q)
    S = _layer_norm(S.permute(0, 2, 3, 1), layer.norm_s).permute(0, 3, 1, 2)  # per pixel, over E
    V = torch.einsum("bke,behw->bkhw", Q, S) / math.sqrt(E)  # Eq. 7, with the documented 1/sqrt(E)
    B, _, h, w = V.shape
    Vf = V.reshape(B, K, h * w)
    sm = Vf.exp() / Vf.exp().sum(-1, keepdim=True)
    pooled = sum(torch.einsum("bn,ben->be", sm[:, i], S.reshape(B, E, -1)) for i in range(K))  # Eq. 8
    m0, m2 = layer.bins_mlp[0], layer.bins_mlp[2]
    x = lin(torch.nn.functional.leaky_relu(lin(pooled, m0)), m2)
    b = torch.log1p(x.exp()) + 1e-3
    b = b / b.sum(1, keepdim=True)
    c = torch.stack([0.5 + 19.5 * (b[:, i] / 2 + b[:, :i].sum(1)) for i in range(D)], 1)  # Eq. 11
    planes = torch.einsum("dk,bkhw->bdhw", layer.to_planes.weight[:, :, 0, 0], V) \
        + layer.to_planes.bias[None, :, None, None]
    p = planes.exp() / planes.exp().sum(1, keepdim=True)  # Eq. 9
    depth = (p * c[:, :, None, None]).sum(1, keepdim=True)  # Eq. 10
    std = (p * (c[:, :, None, None] - depth) ** 2).sum(1, keepdim=True).sqrt()
    return dict(dynamic_queries=q_dyn, self_cost_volume=V, bin_widths=b, bin_centers=c,
                probabilities=p, depth=depth, uncertainty=std)


@pytest.mark.parametrize("mode", ["dynamic", "fixed"])
def test_sd_tokens_match_equations(mode):
    layer = _layer(mode, token_channels=6)
    torch.manual_seed(1)
    S, H = torch.randn(2, E, 6, 10, dtype=torch.double), torch.randn(2, 9, 6, dtype=torch.double)
    out, ref = layer(S, H), _reference(layer, S, H)
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, atol=1e-5, rtol=1e-5, msg=k)
    torch.testing.assert_close(out["bin_widths"].sum(1), torch.ones(2, dtype=torch.double))
    assert (out["bin_widths"] > 0).all()


def test_patch_tokens_match_equations():
    layer = _layer("dynamic")
    S = torch.randn(1, E, 8, 12, dtype=torch.double)
    # SQLdepth-style coarse tokens: conv with kernel = stride = patch (4) -> 2 x 3 = 6 tokens.
    W, bias = layer.patch_embed.weight, layer.patch_embed.bias
    patches = S.reshape(1, E, 2, 4, 3, 4).permute(0, 2, 4, 1, 3, 5).reshape(1, 6, E * 16)
    H = patches @ W.reshape(E, -1).T + bias
    out, ref = layer(S), _reference(layer, S, H)
    for k, v in ref.items():
        torch.testing.assert_close(out[k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_bin_centers_eq11_by_hand():
    b = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    c = bin_centers_from_widths(b, 1.0, 11.0)
    # c_i = 1 + 10 (b_i/2 + sum_{j<i} b_j): 1+10*0.05, 1+10*(0.1+0.1), 1+10*(0.15+0.3), 1+10*(0.2+0.6)
    torch.testing.assert_close(c, torch.tensor([[1.5, 3.0, 5.5, 9.0]]))


def test_fixed_mode_ignores_global_context():
    layer = _layer("fixed", token_channels=6)
    assert not hasattr(layer, "f_adjust")
    S, H = torch.randn(1, E, 4, 4, dtype=torch.double), torch.randn(1, 9, 6, dtype=torch.double)
    q1 = layer(S, H)["dynamic_queries"]
    q2 = layer(S, H + 5.0)["dynamic_queries"]  # shifts g by 5 in every channel
    torch.testing.assert_close(q1, q2)
    torch.testing.assert_close(q1[0], layer.q_base)
    # dynamic mode: the same shift moves every query by f_adjust's response to it
    dyn = _layer("dynamic", token_channels=6)
    d1, d2 = dyn(S, H)["dynamic_queries"], dyn(S, H + 5.0)["dynamic_queries"]
    shift = dyn.f_adjust.weight @ torch.full((6,), 5.0, dtype=torch.double)
    torch.testing.assert_close(d2 - d1, shift.expand(1, K, 6))


def test_none_mode_plain_head_uniform_bins():
    layer = _layer("none")
    assert not any("q_base" in n or "f_adjust" in n for n, _ in layer.named_parameters())
    S = torch.randn(1, E, 4, 5, dtype=torch.double)
    out = layer(S)
    assert "dynamic_queries" not in out
    torch.testing.assert_close(out["bin_centers"][0], 0.5 + 19.5 * (torch.arange(D, dtype=torch.double) + 0.5) / D)
    Sn = _layer_norm(S.permute(0, 2, 3, 1), layer.norm_s).permute(0, 3, 1, 2)
    logits = torch.einsum("de,behw->bdhw", layer.depth_head.weight[:, :, 0, 0], Sn) + layer.depth_head.bias[:, None, None]
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(out["depth"], (p * out["bin_centers"][0][:, None, None]).sum(1, keepdim=True))
    # Features that grew 100x (as a monocular run's decoder did) leave the depth as it was: the
    # unnormalised head saturated its softmax there.
    torch.testing.assert_close(layer(100 * S + 3)["depth"], out["depth"], rtol=1e-4, atol=1e-4)  # LayerNorm eps


def test_wrong_tokens_rejected():
    layer = _layer("dynamic", token_channels=6)
    with pytest.raises(ValueError, match="B x L x 6"):
        layer(torch.randn(1, E, 4, 4, dtype=torch.double), torch.randn(1, 9, 5, dtype=torch.double))
