"""HuggingFace configuration of a mod_megatron GPT (dense or Mixture-of-Depths), exported by
`mod-convert to-hf`. Self-contained: imports only transformers.

Layer i (0-based) is routed (a MoD layer) when `mod_enabled` and i >= `mod_first_routed` and
(i - `mod_first_routed`) % `mod_every` == 0. `routing_mode` picks how a routed layer decides which
tokens it processes:

  causal-predictor  the layer's auxiliary predictor logit > 0 (needs `mod_predictor`)
  causal-router     sigmoid(router logit) > 0.5, i.e. router logit > 0
  topk              the ceil(mod_capacity * n) highest router logits of the sequence (training-time
                    routing; looks at future tokens, so not usable for generation)
"""
from transformers import PretrainedConfig

ROUTING_MODES = ("causal-predictor", "causal-router", "topk")


class ModGPTConfig(PretrainedConfig):
    model_type = "mod_gpt"

    def __init__(self, vocab_size=4096, padded_vocab_size=None, hidden_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, intermediate_size=None, hidden_act="gelu",
                 normalization="LayerNorm", norm_eps=1e-5, max_position_embeddings=128,
                 position_embedding_type="rope", rope_theta=10000.0, initializer_range=0.02,
                 mod_enabled=True, mod_capacity=0.125, mod_every=2, mod_first_routed=1,
                 mod_router_weight="sigmoid", mod_predictor=True, routing_mode=None,
                 tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0, use_cache=False,
                 mod_megatron=None, **kwargs):
        self.vocab_size = vocab_size  # real tokens; logits cover only these
        self.padded_vocab_size = padded_vocab_size or vocab_size  # rows of the embedding / LM head
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads  # query groups (GQA)
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.hidden_act = hidden_act  # gelu (exact erf GELU MLP) | swiglu (gate/up/down)
        self.normalization = normalization  # LayerNorm | RMSNorm
        self.norm_eps = norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type  # rope | learned_absolute
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.mod_enabled = mod_enabled
        self.mod_capacity = mod_capacity
        self.mod_every = mod_every
        self.mod_first_routed = mod_first_routed
        self.mod_router_weight = mod_router_weight  # r = sigmoid(logit) | 2sigmoid: 2*sigmoid(logit) | linear: logit
        self.mod_predictor = mod_predictor
        if routing_mode is None:  # the default of mod-generate, or the router when there is no predictor
            routing_mode = "causal-predictor" if mod_enabled and mod_predictor else "causal-router"
        self.routing_mode = routing_mode
        self.use_cache = use_cache  # no KV cache: every generation step recomputes the sequence
        # The native config tree, iteration and consumed samples, for `mod-convert from-hf`.
        self.mod_megatron = mod_megatron or {}
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def is_routed(self, layer_index):
        """Whether 0-based layer `layer_index` is a MoD layer."""
        first, every = self.mod_first_routed, self.mod_every
        return bool(self.mod_enabled) and layer_index >= first and (layer_index - first) % every == 0
