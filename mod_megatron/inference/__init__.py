"""Inference for trained MoD models: causal routing modes, evaluation (mod-eval) and generation with a
routed KV cache (mod-generate). See docs/inference.md."""
