"""HuggingFace export and import of dense / MoD GPT checkpoints.

    mod-convert to-hf   --checkpoint runs/x/checkpoints --output runs/x/hf
    mod-convert from-hf --input runs/x/hf --output runs/x/from_hf

`to-hf` writes a folder that `transformers.AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)` loads: model.safetensors (HF-style names, q/k/v split out of megatron's
fused linear_qkv), config.json (every hyperparameter, plus the native config tree), the model,
configuration and tokenizer code of mod_megatron/convert/hf_model/, the SentencePiece model and a
tokenizer_config.json for AutoTokenizer. `from-hf` turns such a folder back into a checkpoint of this
stack (iter_NNNNNNN/ + latest, model-only) with bitwise the same weights.

Only dense and MoD GPT models convert; MoE / MoDE checkpoints are refused. Both commands write into a
temporary folder next to the output and rename it at the end: a failure leaves no output behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch

from mod_megatron.convert.common import check_tokenizer, open_source, save_model_only, yaml_value
from mod_megatron.convert.deepspeed import ConversionError
from mod_megatron.training import checkpoint as ckpt

HF_CODE = ("configuration_mod_gpt.py", "modeling_mod_gpt.py", "tokenization_mod_gpt.py")
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.model"
# Native per-layer parameter suffix -> HF suffix (q/k/v and the SwiGLU fc1 are split separately).
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "router.weight": "router.weight",
    "predictor.fc1.weight": "predictor.fc1.weight",
    "predictor.fc1.bias": "predictor.fc1.bias",
    "predictor.fc2.weight": "predictor.fc2.weight",
    "predictor.fc2.bias": "predictor.fc2.bias",
}
MODEL_NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "embedding.position_embeddings.weight": "model.embed_positions.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
}


# ----------------------------------------------------------------------------- weights

def split_qkv(weight: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused [groups * (heads/groups + 2) * d, H] -> q [heads*d, H], k and v [groups*d, H].

    The rows are interleaved per query group: for each group g, its heads/groups query heads, then
    its key head, then its value head. Query head h belongs to group h // (heads/groups).
    """
    per_group = heads // groups
    d = weight.shape[0] // (groups * (per_group + 2))
    w = weight.view(groups, (per_group + 2) * d, -1)
    q = w[:, :per_group * d].reshape(heads * d, -1)
    k = w[:, per_group * d:(per_group + 1) * d].reshape(groups * d, -1)
    v = w[:, (per_group + 1) * d:].reshape(groups * d, -1)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """The inverse of split_qkv."""
    d = k.shape[0] // groups
    h = q.shape[1]
    parts = (q.reshape(groups, heads // groups * d, h), k.reshape(groups, d, h), v.reshape(groups, d, h))
    return torch.cat(parts, dim=1).reshape(-1, h)


def native_to_hf(state: dict, cfg) -> dict:
    """The native model's state dict -> HF-named tensors (contiguous copies)."""
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    out, left = {}, {k: v for k, v in state.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    for key, name in MODEL_NAMES.items():
        if key in left:
            out[name] = left.pop(key)
    for i in range(m.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[q + "self_attn.q_proj.weight"], out[q + "self_attn.k_proj.weight"], out[q + "self_attn.v_proj.weight"] = \
            split_qkv(left.pop(p + "self_attention.linear_qkv.weight"), heads, groups)
        fc1 = left.pop(p + "mlp.linear_fc1.weight")
        if m.activation == "swiglu":  # megatron's GLU: act(first half) * second half
            out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = torch.chunk(fc1, 2, dim=0)
        else:
            out[q + "mlp.up_proj.weight"] = fc1
        for suffix, name in LAYER_NAMES.items():
            if p + suffix in left:
                out[q + name] = left.pop(p + suffix)
    if left:
        raise ConversionError(f"{len(left)} model tensors have no HuggingFace name, e.g. {sorted(left)[0]}")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_to_native(tensors: dict, cfg) -> dict:
    """HF-named tensors -> the native model's state dict (the inverse of native_to_hf)."""
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    left, out = dict(tensors), {}
    try:
        for key, name in MODEL_NAMES.items():
            if name in left:
                out[key] = left.pop(name)
        for i in range(m.num_layers):
            p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
            qkv = [left.pop(q + f"self_attn.{x}_proj.weight") for x in "qkv"]
            out[p + "self_attention.linear_qkv.weight"] = merge_qkv(*qkv, heads, groups)
            up = left.pop(q + "mlp.up_proj.weight")
            fc1 = torch.cat([left.pop(q + "mlp.gate_proj.weight"), up]) if m.activation == "swiglu" else up
            out[p + "mlp.linear_fc1.weight"] = fc1
            for suffix, name in LAYER_NAMES.items():
                if q + name in left:
                    out[p + suffix] = left.pop(q + name)
    except KeyError as e:
        raise ConversionError(f"{WEIGHTS} lacks tensor {e.args[0]}") from None
    except RuntimeError as e:  # a q/k/v of the wrong size
        first = str(e).splitlines()[0]
        raise ConversionError(f"{WEIGHTS}: attention weights do not fit the config ({first})") from None
    if left:
        raise ConversionError(f"{WEIGHTS} has {len(left)} tensors this model does not use, e.g. {sorted(left)[0]}")
    return out


# ----------------------------------------------------------------------------- config

def hf_config(cfg, meta: dict, norm_eps: float) -> dict:
    """config.json of the export: HF-style hyperparameters and the native config tree."""
    from mod_megatron.config import ffn_hidden, padded_vocab

    m, mod = cfg.model, cfg.mod
    return {
        "architectures": ["ModGPTForCausalLM"],
        "model_type": "mod_gpt",
        "auto_map": {"AutoConfig": "configuration_mod_gpt.ModGPTConfig",
                     "AutoModelForCausalLM": "modeling_mod_gpt.ModGPTForCausalLM"},
        "torch_dtype": "float32",
        "vocab_size": m.vocab_size,
        "padded_vocab_size": padded_vocab(m),
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "intermediate_size": ffn_hidden(m),
        "hidden_act": m.activation,
        "normalization": m.normalization,
        "norm_eps": norm_eps,
        "max_position_embeddings": m.seq_length,
        "position_embedding_type": m.position_embedding,
        "rope_theta": float(m.rotary_base),
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": not m.untie_embeddings,
        "mod_enabled": mod.enabled,
        "mod_capacity": mod.capacity,
        "mod_every": mod.every,
        "mod_first_routed": mod.first_routed,
        "mod_router_weight": mod.router_weight,
        "mod_predictor": mod.predictor,
        "routing_mode": "causal-predictor" if mod.enabled and mod.predictor else "causal-router",
        "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
        "use_cache": False,
        "mod_megatron": {"config": cfg.to_dict(), "iteration": meta.get("iteration", 0),
                         "consumed_samples": meta.get("consumed_samples", 0)},
    }


def config_from_hf(hf: dict, where: str):
    """The native Config of an export's config.json (validated)."""
    from mod_megatron.config import Config, ConfigError, load_config, padded_vocab

    if hf.get("model_type") != "mod_gpt":
        raise ConversionError(f"{where}: model_type {hf.get('model_type')!r} is not mod_gpt (not made by to-hf)")
    native = (hf.get("mod_megatron") or {}).get("config") or {}
    if int((native.get("moe") or {}).get("num_experts") or 0) > 0:
        raise ConversionError(f"{where}: MoE / MoDE models cannot be imported (only dense and MoD GPT)")
    try:
        heads, groups = int(hf["num_attention_heads"]), int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
        hidden, ffn = int(hf["hidden_size"]), int(hf["intermediate_size"])
        saved_model = native.get("model") or {}
        model = {
            "num_layers": int(hf["num_hidden_layers"]), "hidden_size": hidden, "num_attention_heads": heads,
            "num_query_groups": None if groups == heads and saved_model.get("num_query_groups") is None else groups,
            "ffn_hidden_size": None if ffn == 4 * hidden and saved_model.get("ffn_hidden_size") is None else ffn,
            "seq_length": int(hf["max_position_embeddings"]), "vocab_size": int(hf["vocab_size"]),
            "normalization": hf["normalization"], "activation": hf["hidden_act"],
            "position_embedding": hf["position_embedding_type"], "rotary_base": int(hf["rope_theta"]),
            "untie_embeddings": not hf.get("tie_word_embeddings", True),
        }
        mod = {"enabled": bool(hf["mod_enabled"]), "capacity": float(hf["mod_capacity"]),
               "every": int(hf["mod_every"]), "first_routed": int(hf["mod_first_routed"]),
               "router_weight": hf["mod_router_weight"], "predictor": bool(hf["mod_predictor"])}
        padded = int(hf.get("padded_vocab_size") or hf["vocab_size"])
    except KeyError as e:
        raise ConversionError(f"{where} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: bad value ({e})") from None
    # The saved tree first (keys this version knows; one process, so no `parallel`), then the HF fields,
    # which define the weights.
    template = Config()
    overrides = [f"--{section}.{key}={yaml_value(value)}" for section, values in native.items()
                 if section != "parallel" and isinstance(values, dict) and hasattr(template, section)
                 for key, value in values.items() if key in getattr(template, section).__dataclass_fields__]
    overrides += [f"--model.{k}={yaml_value(v)}" for k, v in model.items()]
    overrides += [f"--mod.{k}={yaml_value(v)}" for k, v in mod.items()]
    try:
        cfg = load_config(None, overrides)
        if padded_vocab(cfg.model) != padded:  # no native config: pad the vocabulary to the given rows
            cfg = load_config(None, overrides + [f"--model.make_vocab_size_divisible_by={padded}"])
    except ConfigError as e:
        raise ConversionError(f"{where}: {e}") from None
    if padded_vocab(cfg.model) != padded:
        raise ConversionError(f"{where}: padded_vocab_size={padded} is smaller than vocab_size={cfg.model.vocab_size}")
    if float(hf.get("norm_eps", 1e-5)) != 1e-5:
        raise ConversionError(f"{where}: norm_eps={hf['norm_eps']} is not supported (this stack uses 1e-5)")
    return cfg


# ----------------------------------------------------------------------------- output

def check_new_output(path: str) -> None:
    """Refuse an output that exists, unless it is an empty folder."""
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ConversionError(f"{os.path.abspath(path)} already exists; choose a new output folder")


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield a fresh temporary folder next to `final`; rename it to `final` if the block succeeds."""
    final = os.path.abspath(final)
    check_new_output(final)
    parent, base = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(final):  # an empty folder given as the output
            os.rmdir(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _load_tokenizer(path: str):
    from mod_megatron.data.common import DataError
    from mod_megatron.data.tokenizer import SPTokenizer

    try:
        return SPTokenizer(path)
    except DataError as e:
        raise ConversionError(str(e)) from None


def _native_model(cfg):
    from mod_megatron.model.gpt import build_model, transformer_config
    from mod_megatron.training.distributed import init_single_process

    init_single_process(seed=0)
    tcfg = transformer_config(cfg, torch.float32)
    return build_model(cfg, tcfg), tcfg


# ----------------------------------------------------------------------------- the two commands

def to_hf(checkpoint: str, output: str, tokenizer: str | None = None) -> str:
    """Export a checkpoint (root with `latest`, or an iter_* dir) to a HuggingFace folder; return it."""
    from safetensors.torch import save_file

    from mod_megatron.inference.loading import checkpoint_config

    check_new_output(output)
    ckpt_dir, meta = open_source(checkpoint)  # complete, verified, megatron engine
    moe = meta["config"].get("moe") or {}
    if int(moe.get("num_experts") or 0) > 0:
        raise ConversionError(f"{ckpt_dir} is a MoE / MoDE model (moe.num_experts={moe['num_experts']}); only dense "
                              "and MoD GPT checkpoints can be exported to HuggingFace")
    cfg = checkpoint_config(ckpt_dir)
    tok_path = tokenizer or meta.get("tokenizer_model")
    if tokenizer and not os.path.isfile(tokenizer):
        raise ConversionError(f"tokenizer model not found: {tokenizer}")
    if not tok_path or not os.path.isfile(tok_path):
        raise ConversionError(f"the checkpoint's tokenizer model {tok_path or '(none recorded)'} is not there; "
                              "pass --tokenizer PATH (the same SentencePiece model)")
    if meta.get("tokenizer_sha256"):
        check_tokenizer(meta, tok_path, ckpt_dir)  # the one it was trained with
    tok = _load_tokenizer(tok_path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConversionError(f"{tok_path} has {tok.vocab_size} tokens, more than "
                              f"model.vocab_size={cfg.model.vocab_size}")

    model, tcfg = _native_model(cfg)
    ckpt.load(ckpt_dir, [model], load_rng=False)
    tensors = native_to_hf(model.state_dict(), cfg)
    config = hf_config(cfg, meta, tcfg.layernorm_epsilon)
    config["mod_megatron"].update(source=os.path.abspath(ckpt_dir), tokenizer_sha256=tok.sha256)
    code_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_model")
    with atomic_dir(output) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(tmp, WEIGHTS), 0o666 & ~umask)  # safetensors writes it owner-only
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), {
            "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0, "use_cache": False, "do_sample": False,
            "max_length": cfg.model.seq_length})
        for name in HF_CODE:
            shutil.copyfile(os.path.join(code_dir, name), os.path.join(tmp, name))
        shutil.copyfile(tok_path, os.path.join(tmp, TOKENIZER))
        special = {"bos_token": "<s>", "eos_token": "<eod>", "unk_token": "<unk>", "pad_token": "<pad>"}
        _write_json(os.path.join(tmp, "special_tokens_map.json"), special)
        _write_json(os.path.join(tmp, "tokenizer_config.json"), dict(
            special, tokenizer_class="ModGPTTokenizer", model_max_length=cfg.model.seq_length,
            clean_up_tokenization_spaces=False, padding_side="left",
            auto_map={"AutoTokenizer": ["tokenization_mod_gpt.ModGPTTokenizer", None]}))
    return os.path.abspath(output)


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{folder} is not a HuggingFace export (config.json missing)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is corrupt (not JSON: {e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is corrupt (not a JSON object)")
    return data


def from_hf(folder: str, output: str) -> str:
    """Import a `to-hf` folder as a model-only checkpoint root of this stack; return its iter dir."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_new_output(output)
    hf = read_hf_config(folder)
    cfg = config_from_hf(hf, os.path.join(folder, "config.json"))
    try:
        tensors = load_file(os.path.join(folder, WEIGHTS))
    except FileNotFoundError:
        raise ConversionError(f"{folder}: {WEIGHTS} missing") from None
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{folder}/{WEIGHTS} is corrupt ({e})") from None
    tok_path = os.path.join(folder, TOKENIZER)
    tok = _load_tokenizer(tok_path) if os.path.isfile(tok_path) else None

    model, _ = _native_model(cfg)
    state = hf_to_native(tensors, cfg)
    own = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ConversionError(f"{folder}/{WEIGHTS} lacks {len(missing)} tensors of this model, e.g. {missing[0]}")
    for key, value in state.items():
        if key not in own or own[key].shape != value.shape:
            want = tuple(own[key].shape) if key in own else "no such tensor"
            raise ConversionError(f"{folder}/{WEIGHTS}: {key} has shape {tuple(value.shape)}, the config says {want}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)

    info = hf.get("mod_megatron") or {}
    iteration = int(info.get("iteration") or 0)
    final_root = os.path.abspath(output)
    meta = {"config": cfg.to_dict(), "consumed_samples": int(info.get("consumed_samples") or 0),
            "converted_from": os.path.abspath(folder), "layout": {"tp": 1, "pp": 1, "dp": 1, "vpp": None}}
    if tok is not None:  # copied to the checkpoint root; mod-generate finds it through mod_meta.json
        meta.update(tokenizer_sha256=tok.sha256, tokenizer_model=os.path.join(final_root, TOKENIZER))
    with atomic_dir(output) as root:
        if tok is not None:
            shutil.copyfile(tok_path, os.path.join(root, TOKENIZER))
        save_model_only(root, iteration, [model], meta)
    return os.path.join(final_root, ckpt.iter_dirname(iteration))
