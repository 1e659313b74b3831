"""Checkpoint conversion (`mod-convert`): one module per conversion, a shared CLI in cli.py."""
