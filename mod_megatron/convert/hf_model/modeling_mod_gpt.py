"""HuggingFace model of a mod_megatron GPT (dense or Mixture-of-Depths), exported by `mod-convert to-hf`.

Self-contained (imports only torch and transformers); the same math as the native model's forward:
pre-norm layers (LayerNorm or RMSNorm), grouped-query causal attention with RoPE (or learned absolute
positions), a GELU or SwiGLU MLP, no linear biases, and the final norm + LM head.

A routed (MoD) layer processes only the tokens it routes; the others skip it unchanged:

    x_out[t] = x[t] + r_t * (block(x)[t] - x[t])   for routed tokens t, r_t = sigmoid(logit_t) (or see router_weight)
    x_out[t] = x[t]                               for skipped tokens

The routed tokens of a sequence are gathered in their original order, attend causally among
themselves only (a skipped token adds no key or value in that layer) and keep their original RoPE
positions. Which tokens are routed follows `config.routing_mode` (see configuration_mod_gpt.py);
the causal modes decide per token, so generation needs no look-ahead. There is no KV cache: each
generation step recomputes the whole sequence, which gives exactly the causal-mode forward.
Padding (attention_mask == 0) skips every layer, so padded tokens are never keys.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mod_gpt import ROUTING_MODES, ModGPTConfig


def _norm(config):
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def _rotate_half(x):
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_angles(positions, head_dim, base):
    """[B, n] integer positions -> [B, 1, n, head_dim] angles (the two halves repeat)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return torch.cat((freqs, freqs), dim=-1).unsqueeze(1)


def router_weight(logits, kind):
    """The weight r that scales a routed token's residual branch."""
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind == "2sigmoid":  # r = 1 at logit 0 (models converted with mod-convert dense-to-mod)
        return 2.0 * torch.sigmoid(logits)
    if kind == "linear":
        return logits
    raise ValueError(f"unknown mod_router_weight {kind!r}")


class ModGPTAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.groups, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, angles):
        """x [B, n, H] (tokens in original order), angles [B, 1, n, d] or None -> [B, n, H]."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.groups, self.head_dim).transpose(1, 2)
        if angles is not None:
            cos, sin = torch.cos(angles).to(q.dtype), torch.sin(angles).to(q.dtype)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, enable_gqa=self.groups != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class ModGPTMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.hidden_act == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class ModGPTRouter(nn.Module):
    """One bias-free weight vector: each token's routing logit is x . w, in fp32."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, x):
        return torch.matmul(x.float(), self.weight.float())


class ModGPTPredictor(nn.Module):
    """The auxiliary causal predictor (H -> H/8 -> GELU -> 1): logit > 0 means "route this token"."""

    def __init__(self, config):
        super().__init__()
        inner = max(1, config.hidden_size // 8)
        self.fc1 = nn.Linear(config.hidden_size, inner)
        self.fc2 = nn.Linear(inner, 1)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x.to(self.fc1.weight.dtype)))).squeeze(-1).float()


class ModGPTLayer(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        self.config = config
        self.input_layernorm = _norm(config)
        self.self_attn = ModGPTAttention(config)
        self.post_attention_layernorm = _norm(config)
        self.mlp = ModGPTMLP(config)
        self.routed = config.is_routed(layer_index)
        if self.routed:
            self.router = ModGPTRouter(config)
            self.predictor = ModGPTPredictor(config) if config.mod_predictor else None
        self.last_routed = None  # [B, S] bool: the tokens this layer processed in the last forward

    def block(self, x, angles):
        """The pre-norm transformer layer (attention + MLP with their residuals) on x [B, n, H]."""
        y = x + self.self_attn(self.input_layernorm(x), angles)
        return y + self.mlp(self.post_attention_layernorm(y))

    def decide(self, x, logits, active):
        """[B, S] bool: which tokens this routed layer processes, per `config.routing_mode`."""
        mode = self.config.routing_mode
        if mode == "causal-router":
            return (logits > 0) & active
        if mode == "causal-predictor":
            if self.predictor is None:
                raise ValueError("routing_mode causal-predictor needs a model with the predictor (mod_predictor)")
            return (self.predictor(x) > 0) & active
        if mode == "topk":
            decide = torch.zeros_like(active)
            for row in range(x.shape[0]):
                n = int(active[row].sum())
                if n == 0:
                    continue
                k = max(1, min(n, math.ceil(self.config.mod_capacity * n - 1e-9)))
                scores = logits[row].masked_fill(~active[row], float("-inf"))
                decide[row, torch.topk(scores, k).indices] = True
            return decide
        raise ValueError(f"unknown routing_mode {mode!r}; choose from {', '.join(ROUTING_MODES)}")

    def forward(self, hidden, active, positions):
        """hidden [B, S, H], active [B, S] (False = padding), positions [B, S] (original positions)."""
        weight = None
        routed = active
        if self.routed:
            logits = self.router(hidden)
            routed = self.decide(hidden, logits, active)
            weight = router_weight(logits, self.config.mod_router_weight)
        self.last_routed = routed
        b, s, h = hidden.shape
        counts = routed.sum(1)
        k = int(counts.max())
        if k == 0:
            return hidden
        # Routed positions of each row first, in original order; rows with fewer are padded at the end
        # (with skipped positions), which causal attention keeps out of the real rows' view.
        arange = torch.arange(s, device=hidden.device).expand(b, s)
        order = torch.argsort(torch.where(routed, arange, arange + s), dim=1)[:, :k]
        valid = torch.arange(k, device=hidden.device).unsqueeze(0) < counts.unsqueeze(1)
        x = torch.gather(hidden, 1, order.unsqueeze(-1).expand(b, k, h))
        angles = None
        if self.config.position_embedding_type == "rope":
            angles = rotary_angles(torch.gather(positions, 1, order), self.config.head_dim, self.config.rope_theta)
        y = self.block(x, angles)
        if weight is not None:
            r = torch.gather(weight, 1, order).unsqueeze(-1).to(y.dtype)
            y = x + r * (y - x)
        # Write back the real rows only: padded rows go to a dummy row past the sequence.
        index = torch.where(valid, order, s).unsqueeze(-1).expand(b, k, h)
        out = torch.cat([hidden, hidden.new_zeros(b, 1, h)], dim=1).scatter(1, index, y)
        return out[:, :s]


class ModGPTPreTrainedModel(PreTrainedModel):
    config_class = ModGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["ModGPTLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.weight.data.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, ModGPTRouter):
            module.weight.data.normal_(0.0, std)


class ModGPTModel(ModGPTPreTrainedModel):
    """Embeddings, the layers and the final norm: [B, S] token ids -> [B, S, H] hidden states."""

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(ModGPTLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config)
        self.last_active = None  # [B, S] bool: the non-padding tokens of the last forward
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        b, s = input_ids.shape
        active = torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
        if attention_mask is not None:
            active = attention_mask.to(torch.bool)
        if position_ids is None:  # positions count real tokens only (left padding starts them at 0)
            position_ids = (active.long().cumsum(1) - 1).clamp(min=0)
        self.last_active = active
        hidden = self.embed_tokens(input_ids)
        if self.config.position_embedding_type == "learned_absolute":
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(f"sequence longer than max_position_embeddings={self.config.max_position_embeddings}")
            hidden = hidden + self.embed_positions(position_ids)
        for layer in self.layers:
            hidden = layer(hidden, active, position_ids)
        return self.norm(hidden)


class ModGPTForCausalLM(ModGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = ModGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # no KV cache: generate() passes the whole sequence every step

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def routed_fractions(self):
        """Share of the (non-padding) tokens each layer processed in the last forward."""
        real = self.model.last_active.sum().clamp(min=1)
        return [float(layer.last_routed.sum() / real) for layer in self.model.layers]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, return_dict=None,
                **kwargs):
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        full = self.lm_head(hidden).float()  # [B, S, padded_vocab_size]
        # The padding rows are never real tokens: the logits (and so generation) leave them out, while
        # the loss normalises over all rows like the training loss and mod-eval do.
        logits = full[..., :self.config.vocab_size]
        loss = None
        if labels is not None:  # labels = input_ids (shifted here), -100 = ignore
            loss = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
