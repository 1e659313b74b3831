"""mod_megatron: Mixture-of-Depths (MoD) and MoDE language models on megatron-core."""

__version__ = "0.1.0"
