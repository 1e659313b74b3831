"""Fused GPU kernels (Triton). Nothing here imports triton at import time; see kernels/routing.py."""
