"""mod-convert to-hf / from-hf: a native checkpoint loads in transformers (trust_remote_code) with the same
causal-mode logits and greedy generations, comes back bitwise, and bad input leaves no output."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
S, V = 32, 400
BASE = ["--model.num_layers=4", "--model.hidden_size=64", f"--model.seq_length={S}", f"--model.vocab_size={V}",
        "--mod.capacity=0.25", "--mod.router_init_std=0.5"]
CASES = {  # every other layer routed (1 and 3), predictor on, in both
    "mha-layernorm-gelu-tied": ["--model.num_attention_heads=4"],
    "gqa-rmsnorm-swiglu-untied": ["--model.num_attention_heads=8", "--model.num_query_groups=2",
                                  "--model.normalization=RMSNorm", "--model.activation=swiglu",
                                  "--model.untie_embeddings=true", "--mod.router_weight=linear"],
}
TOL = 2e-5  # max |logit difference|, fp32 (measured ~2e-6)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    """A small lossless SentencePiece model (vocab 400) trained on the repo's docs."""
    from mod_megatron.data.tokenizer import train_tokenizer

    texts = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "spm.model"), vocab_size=V)


def _native_checkpoint(root, tokenizer_model, overrides, seed=3):
    """A random-init model with mixed routing decisions, saved as this stack's checkpoint (iteration 7)."""
    from megatron.core import dist_checkpointing

    from mod_megatron.config import load_config
    from mod_megatron.data.tokenizer import SPTokenizer
    from mod_megatron.model.gpt import build_model, transformer_config
    from mod_megatron.training import checkpoint as ckpt
    from mod_megatron.training.distributed import init_single_process

    init_single_process(seed)
    cfg = load_config(None, BASE + overrides)
    model = build_model(cfg, transformer_config(cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every weight off its init (norms, biases) and make the predictor undecided
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            if name.endswith(("predictor.fc1.bias", "predictor.fc2.bias")):
                p.zero_()
            if name.endswith("predictor.fc2.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
    tok = SPTokenizer(tokenizer_model)
    tmp = ckpt.begin(str(root), 7)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 7}, tmp)
    meta = {"config": cfg.to_dict(), "consumed_samples": 56, "tokenizer_model": tok.model_path,
            "tokenizer_sha256": tok.sha256}
    return ckpt.publish(str(root), 7, tmp, meta)


def _load_native(ckpt_dir):
    from mod_megatron.convert.hf import _native_model
    from mod_megatron.inference.loading import checkpoint_config
    from mod_megatron.training import checkpoint as ckpt

    cfg = checkpoint_config(ckpt_dir)
    model, _ = _native_model(cfg)
    ckpt.load(ckpt_dir, [model], load_rng=False)
    return cfg, model.eval()


def _convert(*args) -> int:
    from mod_megatron.convert.cli import main

    return main(list(args))


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory, tokenizer_model, megatron_single_rank):
    base = tmp_path_factory.mktemp(request.param)
    ckpt_dir = _native_checkpoint(base / "native", tokenizer_model, CASES[request.param])
    assert _convert("to-hf", "--checkpoint", str(base / "native"), "--output", str(base / "hf")) == 0
    return {"name": request.param, "ckpt": ckpt_dir, "hf": str(base / "hf"), "base": base}


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def _routed_masks(native, hf_model):
    """Per MoD layer: (native routed mask [B, S], HF routed mask [B, S]) of the last forward."""
    from mod_megatron.model.mod_layer import MoDTransformerLayer

    out = []
    for i, layer in enumerate(native.decoder.layers):
        if isinstance(layer, MoDTransformerLayer):
            r = layer.last_routing
            valid = r.valid if r.valid is not None else torch.ones_like(r.index, dtype=torch.bool)
            mask = torch.zeros(S + 1, r.index.shape[1], dtype=torch.bool).scatter(0, r.index, valid)[:S].T
            out.append((mask, hf_model.model.layers[i].last_routed))
    return out


@pytest.mark.parametrize("mode", ["causal-predictor", "causal-router", "topk"])
def test_hf_logits_match_native_in_every_routing_mode(exported, mode):
    from mod_megatron.model.mod_layer import set_routing_mode

    cfg, native = _load_native(exported["ckpt"])
    hf_model = _hf_model(exported["hf"])
    assert hf_model.config.routing_mode == "causal-predictor"  # the stack's default for sampling
    hf_model.config.routing_mode = mode
    tokens = torch.randint(0, V, (3, S), generator=torch.Generator().manual_seed(5))
    set_routing_mode([native], mode)
    with torch.no_grad():
        ref = native(tokens, torch.arange(S).expand(3, S), None)[..., :V]
        got = hf_model(input_ids=tokens).logits
    assert got.shape == ref.shape == (3, S, V)
    diff = (got - ref).abs().max().item()
    print(f"{exported['name']} {mode}: max |dlogit| = {diff:.2e}")
    assert diff <= TOL
    masks = _routed_masks(native, hf_model)
    assert [i for i, layer in enumerate(hf_model.model.layers) if layer.routed] == [1, 3]
    for native_mask, hf_mask in masks:
        assert torch.equal(native_mask, hf_mask)  # the same tokens skip the same layers
        assert 0 < int(hf_mask.sum()) < hf_mask.numel()  # mixed routing: the test can tell them apart


def test_greedy_generation_matches_native_cached_decoder(exported):
    from mod_megatron.inference.generate import generate

    cfg, native = _load_native(exported["ckpt"])
    hf_model = _hf_model(exported["hf"])
    prompt = [int(t) for t in torch.randint(5, V, (6,), generator=torch.Generator().manual_seed(9))]
    for mode in ("causal-predictor", "causal-router"):
        (ref,), _ = generate(native, [prompt], 16, eos_id=3, max_len=S, mode=mode, vocab_size=V, greedy=True)
        hf_model.config.routing_mode = mode
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
        assert out[0, :len(prompt)].tolist() == prompt
        assert out[0, len(prompt):].tolist() == ref, mode
        assert len(ref) == 16 or ref[-1] == 3


def test_left_padded_batch_generates_like_each_prompt_alone(exported):
    from mod_megatron.inference.generate import generate

    cfg, native = _load_native(exported["ckpt"])
    hf_model = _hf_model(exported["hf"])
    g = torch.Generator().manual_seed(13)
    prompts = [[int(t) for t in torch.randint(5, V, (n,), generator=g)] for n in (9, 4)]
    refs, _ = generate(native, prompts, 10, eos_id=3, max_len=S, mode="causal-predictor", vocab_size=V, greedy=True)
    ids = torch.zeros(2, 9, dtype=torch.long)  # pad id 0 on the left
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 9 - len(p):], mask[row, 9 - len(p):] = torch.tensor(p), 1
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for row, ref in enumerate(refs):
        new = out[row, 9:].tolist()
        assert new[:len(ref)] == ref and all(t == 0 for t in new[len(ref):])  # then padding after EOS


def test_export_folder_config_and_tokenizer(exported, tokenizer_model):
    from transformers import AutoTokenizer

    from mod_megatron.data.tokenizer import SPTokenizer

    hf = exported["hf"]
    names = set(os.listdir(hf))
    assert {"model.safetensors", "config.json", "generation_config.json", "configuration_mod_gpt.py",
            "modeling_mod_gpt.py", "tokenization_mod_gpt.py", "tokenizer.model", "tokenizer_config.json"} <= names
    assert not glob.glob(os.path.join(os.path.dirname(hf), ".hf.tmp-*"))
    config = json.load(open(os.path.join(hf, "config.json")))
    gqa = exported["name"].startswith("gqa")
    assert config["model_type"] == "mod_gpt" and config["num_key_value_heads"] == (2 if gqa else 4)
    assert (config["mod_capacity"], config["mod_every"], config["mod_first_routed"]) == (0.25, 2, 1)
    assert config["mod_router_weight"] == ("linear" if gqa else "sigmoid") and config["mod_predictor"] is True
    assert config["tie_word_embeddings"] is (not gqa) and config["padded_vocab_size"] == 512
    assert config["mod_megatron"]["iteration"] == 7
    from safetensors import safe_open

    with safe_open(os.path.join(hf, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        k = f.get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert q.shape == (64, 64) and k.shape == ((16, 64) if gqa else (64, 64))
    assert ("lm_head.weight" in keys) is gqa and "model.layers.1.router.weight" in keys
    assert "model.layers.0.router.weight" not in keys and "model.layers.3.predictor.fc2.bias" in keys

    tok = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)
    native = SPTokenizer(tokenizer_model)
    text = "To be, or not\n\tto be: 3.14 caf\u00e9 \U0001F600 \u2581x <eod> end"
    ids = tok(text)["input_ids"]
    assert ids == native.tokenize(text) and ids[0] != 2  # no BOS, the stack's exact encoding
    assert tok.decode(ids) == text and tok.eos_token_id == 3 and tok.pad_token_id == 0


def test_from_hf_round_trip_is_bitwise(exported):
    from mod_megatron.training import checkpoint as ckpt

    out = exported["base"] / "back"
    assert _convert("from-hf", "--input", exported["hf"], "--output", str(out)) == 0
    assert (out / "latest").read_text().strip() == "7"
    back_dir = str(out / "iter_0000007")
    assert ckpt.verify(back_dir) is None
    meta, orig = ckpt.read_meta(back_dir), ckpt.read_meta(exported["ckpt"])
    assert meta["model_only"] and meta["consumed_samples"] == 56
    for section in set(orig["config"]) - {"parallel"}:  # model, mod, moe, train, data, ...
        assert meta["config"][section] == orig["config"][section], section
    assert meta["tokenizer_sha256"] == orig["tokenizer_sha256"] and os.path.isfile(meta["tokenizer_model"])
    _, a = _load_native(exported["ckpt"])
    _, b = _load_native(back_dir)
    sa, sb = a.state_dict(), b.state_dict()
    tensors = [k for k, v in sa.items() if torch.is_tensor(v)]
    assert len(tensors) > 30 and set(tensors) == {k for k, v in sb.items() if torch.is_tensor(v)}
    assert all(torch.equal(sa[k], sb[k]) for k in tensors)


@pytest.mark.parametrize("overrides", [
    ["--model.position_embedding=learned_absolute", "--mod.router_weight=2sigmoid", "--mod.predictor=false"],
    ["--mod.enabled=false", "--model.num_query_groups=1"],
], ids=["learned-positions-2sigmoid-no-predictor", "dense-mqa"])
def test_other_variants_match_native(tmp_path, tokenizer_model, megatron_single_rank, overrides):
    from mod_megatron.inference.generate import generate
    from mod_megatron.model.mod_layer import set_routing_mode

    ckpt_dir = _native_checkpoint(tmp_path / "native", tokenizer_model, ["--model.num_attention_heads=4", *overrides])
    assert _convert("to-hf", "--checkpoint", ckpt_dir, "--output", str(tmp_path / "hf")) == 0
    cfg, native = _load_native(ckpt_dir)
    hf_model = _hf_model(str(tmp_path / "hf"))
    assert hf_model.config.routing_mode == "causal-router"  # no predictor: the router decides
    set_routing_mode([native], "causal-router")
    tokens = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = native(tokens, torch.arange(S).expand(2, S), None)[..., :V]
        got = hf_model(input_ids=tokens).logits
    assert (got - ref).abs().max().item() <= TOL
    with torch.no_grad():  # the LM loss, normalised over the padded vocabulary like training's
        losses = native(tokens, torch.arange(S).expand(2, S), None, labels=torch.roll(tokens, -1, 1))
        hf_loss = hf_model(input_ids=tokens, labels=tokens).loss
    assert abs(hf_loss.item() - losses[:, :-1].mean().item()) <= 1e-5
    routed = [layer.last_routed.float().mean().item() for layer in hf_model.model.layers]
    assert routed[0] == 1.0 and (0 < routed[1] < 1) == cfg.mod.enabled
    prompt = tokens[0, :5].tolist()
    (want,), _ = generate(native, [prompt], 12, eos_id=3, max_len=S, mode="causal-router", vocab_size=V, greedy=True)
    assert hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 5:].tolist() == want


def test_split_qkv_follows_megatrons_per_group_interleaving():
    from mod_megatron.convert.hf import merge_qkv, split_qkv

    heads, groups, d, h = 6, 3, 2, 5
    # Row label = 100*group + 10*slot + row-in-head, slot 0..1 = query heads of the group, 2 = key, 3 = value.
    rows = [100 * g + 10 * slot + r for g in range(groups) for slot in range(4) for r in range(d)]
    fused = torch.tensor(rows, dtype=torch.float32).unsqueeze(1).expand(len(rows), h).contiguous()
    q, k, v = split_qkv(fused, heads, groups)
    assert q[:, 0].tolist() == [100 * g + 10 * s + r for g in range(groups) for s in range(2) for r in range(d)]
    assert k[:, 0].tolist() == [100 * g + 20 + r for g in range(groups) for r in range(d)]
    assert v[:, 0].tolist() == [100 * g + 30 + r for g in range(groups) for r in range(d)]
    assert torch.equal(merge_qkv(q, k, v, heads, groups), fused)


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_moe_checkpoint_is_refused(tmp_path, tokenizer_model, megatron_single_rank, capsys):
    ckpt_dir = _native_checkpoint(tmp_path / "moe", tokenizer_model,
                                  ["--model.num_attention_heads=4", "--moe.num_experts=4", "--moe.topk=2"])
    assert any(name.startswith("__") for name in os.listdir(ckpt_dir))  # a real, complete checkpoint
    assert _convert("to-hf", "--checkpoint", str(tmp_path / "moe"), "--output", str(tmp_path / "hf")) == 2
    assert "MoE / MoDE" in _one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["moe"]  # no output, no temporary folder


@pytest.mark.parametrize("damage", ["truncated", "wrong-shape", "moe"])
def test_bad_config_json_is_one_error_line_and_no_output(exported, tmp_path, capsys, damage):
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(exported["hf"], src)
    text = (src / "config.json").read_text()
    if damage == "truncated":
        (src / "config.json").write_text(text[:len(text) // 2])
    else:
        config = json.loads(text)
        if damage == "wrong-shape":
            config["intermediate_size"] = 96
        else:
            config["mod_megatron"]["config"]["moe"]["num_experts"] = 4
        (src / "config.json").write_text(json.dumps(config))
    assert _convert("from-hf", "--input", str(src), "--output", str(tmp_path / "out")) == 2
    line = _one_error_line(capsys)
    assert {"truncated": "not JSON", "wrong-shape": "has shape", "moe": "MoE / MoDE"}[damage] in line
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_to_hf_refuses_an_existing_output(exported, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert _convert("to-hf", "--checkpoint", exported["ckpt"], "--output", str(tmp_path / "hf")) == 2
    assert "already exists" in _one_error_line(capsys)
    assert os.listdir(tmp_path / "hf") == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["hf"]
