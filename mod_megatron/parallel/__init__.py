"""Glue between the MoD model and megatron-core's parallel layouts.

- `sequence`: MoD routing under sequence parallelism (top-k over the whole sequence when each tensor-
  parallel rank holds a slice of it).
- `norm`: the torch LayerNorm / RMSNorm with parameters marked for sequence parallelism.
- `stages`: cost-aware assignment of layers to pipeline stages (MoD layers are cheaper than dense ones).

The model code knows nothing about process groups; everything that talks to them lives here.
"""
