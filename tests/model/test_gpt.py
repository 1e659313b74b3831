"""The GPT built from the config: forward/backward, layer placement, SDPA core attention, overfitting."""
from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_layer import TransformerLayer

from mod_megatron.config import load_config
from mod_megatron.model.attention import SDPAttention
from mod_megatron.model.fused_layer import FusedTransformerLayer
from mod_megatron.model.gpt import transformer_config
from mod_megatron.model.mod_layer import MoDTransformerLayer
from mod_megatron.model.spec import block_spec, is_routed, layer_specs

S = 32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the trainer would put the model


@pytest.fixture
def build_gpt(build_gpt):
    """conftest's build_gpt, with the model on DEVICE (as the trainer moves it; built, it spans devices)."""
    def build(*overrides, **kwargs):
        cfg, model = build_gpt(*overrides, **kwargs)
        return cfg, model.to(DEVICE)

    return build


def _batch(batch=2, seed=1, vocab=100):
    """(tokens, position_ids, next-token labels) of a random batch, on DEVICE."""
    tokens = torch.randint(0, vocab, (batch, S + 1), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return tokens[:, :-1], torch.arange(S, device=DEVICE).unsqueeze(0).expand(batch, S), tokens[:, 1:]


@pytest.mark.parametrize("overrides", [
    ["--mod.enabled=false"],
    [],
    ["--mod.every=1", "--mod.first_routed=0", "--mod.router_weight=linear"],
    ["--model.position_embedding=learned_absolute", "--model.activation=swiglu", "--model.normalization=RMSNorm",
     "--model.num_query_groups=2", "--model.untie_embeddings=true"],
], ids=["dense", "mod", "mod-every-layer-linear", "mod-abs-swiglu-rms-gqa-untied"])
def test_forward_backward_gives_finite_loss_and_grads_everywhere(build_gpt, overrides):
    cfg, model = build_gpt(*overrides)
    tokens, pos, labels = _batch()
    loss = model(tokens, pos, None, labels=labels)
    assert loss.shape == (2, S) and torch.isfinite(loss).all()
    assert abs(loss.detach().mean().item() - math.log(128)) < 0.3  # near-uniform over the padded vocab
    loss.mean().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert missing == []
    if cfg.model.untie_embeddings:
        assert model.output_layer.weight is not model.embedding.word_embeddings.weight


def test_same_seed_builds_same_weights(build_gpt):
    _, a = build_gpt(seed=3)
    _, b = build_gpt(seed=3)
    _, c = build_gpt(seed=4)
    sa, sb, sc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not torch.equal(sa["decoder.layers.1.router.weight"], sc["decoder.layers.1.router.weight"])


@pytest.mark.parametrize("layers,every,first,routed", [
    (4, 2, 1, [1, 3]),  # paper: every other layer, layer 0 dense
    (6, 2, 0, [0, 2, 4]),
    (4, 1, 0, [0, 1, 2, 3]),
    (8, 3, 2, [2, 5]),
    (4, 2, 3, [3]),
])
def test_layer_specs_route_where_the_config_says(layers, every, first, routed):
    cfg = load_config(None, [f"--model.num_layers={layers}", f"--mod.every={every}", f"--mod.first_routed={first}"])
    assert [i for i in range(layers) if is_routed(cfg, i)] == routed
    specs = layer_specs(cfg)
    assert [i for i, s in enumerate(specs) if s.module is MoDTransformerLayer] == routed
    # dense layers: megatron's TransformerLayer with the fused fast path (model.fused_layer)
    assert all(s.module is FusedTransformerLayer for i, s in enumerate(specs) if i not in routed)
    assert issubclass(FusedTransformerLayer, TransformerLayer) and issubclass(MoDTransformerLayer, FusedTransformerLayer)
    cfg.mod.enabled = False
    assert all(s.module is FusedTransformerLayer for s in layer_specs(cfg))


def test_built_mod_model_has_routers_on_routed_layers_with_config_capacity(build_gpt):
    cfg, model = build_gpt("--mod.capacity=0.3", "--mod.router_weight=linear")
    kinds = [type(layer) for layer in model.decoder.layers]
    assert kinds == [FusedTransformerLayer, MoDTransformerLayer, FusedTransformerLayer, MoDTransformerLayer]
    for layer in model.decoder.layers[1::2]:
        assert layer.capacity == 0.3 and layer.router_weight_kind == "linear"
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, SDPAttention)


def test_dense_model_has_no_routers(build_gpt):
    _, model = build_gpt("--mod.enabled=false")
    assert not any(isinstance(m, MoDTransformerLayer) for m in model.modules())
    assert not any("router" in n for n, _ in model.named_parameters())


def test_block_spec_slices_pipeline_stages_by_global_layer_index():
    cfg = load_config(None, ["--model.num_layers=8", "--parallel.pp=2", "--parallel.vpp=2"])
    tcfg = transformer_config(cfg)
    def routed(pp_rank, vp_stage):
        return [s.module is MoDTransformerLayer for s in block_spec(cfg, tcfg, vp_stage=vp_stage, pp_rank=pp_rank).layer_specs]
    # 4 chunks of 2 layers: (pp0,vp0)=0,1 (pp1,vp0)=2,3 (pp0,vp1)=4,5 (pp1,vp1)=6,7; routed = odd layers
    for pp_rank in (0, 1):
        for vp in (0, 1):
            assert routed(pp_rank, vp) == [False, True]
    cfg = load_config(None, ["--model.num_layers=6", "--parallel.pp=2", "--mod.every=3", "--mod.first_routed=1"])
    tcfg = transformer_config(cfg)
    assert [routed(r, None) for r in (0, 1)] == [[False, True, False], [False, True, False]]  # layers 1 and 4


def _reference_attention(q, k, v, causal, scale=None):
    """Plain softmax attention on megatron's [s, b, heads, d] layout; KV groups serve consecutive query heads."""
    sq, b, nq, d = q.shape
    rep = nq // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    scores = torch.einsum("sbhd,tbhd->bhst", q.double(), k.double()) * (scale if scale else 1 / math.sqrt(d))
    if causal:
        scores = scores.masked_fill(torch.triu(torch.ones(sq, sq, dtype=torch.bool), 1), float("-inf"))
    out = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v.double())
    return out.reshape(sq, b, nq * d).float()


@pytest.mark.parametrize("groups", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("mask,scale", [(AttnMaskType.causal, None), (AttnMaskType.causal, 0.3),
                                        (AttnMaskType.no_mask, None)])
def test_sdpa_matches_plain_softmax_attention(megatron_single_rank, groups, mask, scale):
    cfg = load_config(None, ["--model.hidden_size=64", f"--model.num_query_groups={groups}"])
    attn = SDPAttention(transformer_config(cfg), layer_number=1, attn_mask_type=mask, attention_type="self",
                        softmax_scale=scale).eval()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 3, 4, 16, generator=g) * 2
    k, v = (torch.randn(12, 3, groups, 16, generator=g) * 2 for _ in range(2))
    out = attn(q, k, v, attention_mask=None)
    assert out.shape == (12, 3, 64)
    torch.testing.assert_close(out, _reference_attention(q, k, v, mask == AttnMaskType.causal, scale),
                               rtol=1e-5, atol=1e-5)
    if mask == AttnMaskType.causal:  # the mask really matters on this data
        assert (out - _reference_attention(q, k, v, False, scale)).abs().max() > 1e-2


def test_sdpa_rejects_non_causal_masks(megatron_single_rank):
    cfg = load_config(None, [])
    with pytest.raises(ValueError, match="causal"):
        SDPAttention(transformer_config(cfg), 1, AttnMaskType.padding, "self")


def _local_loss(build_gpt):
    _, local = build_gpt("--model.attention_backend=local", "--model.num_query_groups=2")
    tokens, pos, labels = _batch()
    return local, local(tokens, pos, None, labels=labels)


def test_sdpa_model_matches_megatron_local_attention_model(build_gpt):
    _, sdpa = build_gpt("--model.num_query_groups=2")
    local, _ = _local_loss(build_gpt)
    assert not isinstance(local.decoder.layers[0].self_attention.core_attention, SDPAttention)
    local.load_state_dict(sdpa.state_dict())
    tokens, pos, labels = _batch()
    torch.testing.assert_close(sdpa(tokens, pos, None, labels=labels), local(tokens, pos, None, labels=labels),
                               rtol=1e-5, atol=1e-5)


def test_local_attention_backend_runs_on_cpu(build_gpt):
    _, loss = _local_loss(build_gpt)
    assert torch.isfinite(loss).all()


def test_mod_model_overfits_a_fixed_batch(build_gpt):
    _, model = build_gpt("--mod.capacity=0.5")
    tokens, pos, labels = _batch(batch=4)
    router0 = model.decoder.layers[1].router.weight.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = model(tokens, pos, None, labels=labels).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.4 * losses[0], losses  # ~4.85 -> ~1.1 in 25 steps
    assert not torch.equal(model.decoder.layers[1].router.weight, router0)  # the router trains too
