"""The files `mod-convert to-hf` copies into a HuggingFace export (loaded there with trust_remote_code)."""
