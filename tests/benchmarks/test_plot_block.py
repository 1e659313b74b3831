"""tools/plot_block.py reads bench_block's table (the plotting itself needs matplotlib, not a dependency)."""
from __future__ import annotations

from tools.plot_block import parse

TABLE = """# NVIDIA H200, bfloat16, S=4096, B=2, fwd+bwd of one layer
| d | layer | ms/step | vs dense | graph ms | vs dense (graph) | ideal |
|---|---|---|---|---|---|---|
| 1024 | dense | 2.61 | 1.00x | 2.33 | 1.00x | 1.00x |
| 1024 | MoD c=0.5 | 5.68 | 0.46x | 1.62 | 1.44x | 2.00x |
| 1024 | MoD c=0.125 | 4.59 | 0.57x | - | - | 8.00x |
#   MoD c=0.125: capture failed: X
| 2048 | MoD c=0.125 | 4.68 | 1.28x | 1.56 | 3.91x | 8.00x |
"""


def test_rows_of_mod_layers_per_width():
    data = parse(TABLE)
    assert data["title"].startswith("NVIDIA H200")
    assert data["rows"][1024] == {"c": [0.5, 0.125], "eager": [0.46, 0.57], "graph": [1.44, None], "first": []}
    assert data["rows"][2048] == {"c": [0.125], "eager": [1.28], "graph": [3.91], "first": []}


def test_the_first_micro_batch_column_when_the_table_has_it():
    table = """# NVIDIA H100 80GB HBM3, bfloat16, S=4096, B=4, fwd+bwd of one layer
| d | layer | ms/step | vs dense | graph ms | vs dense (graph) | graph ms, 1st micro-batch | vs dense (graph, 1st) | ideal |
|---|---|---|---|---|---|---|---|---|
| 2048 | dense | 12.00 | 1.00x | 10.06 | 1.00x | 9.99 | 1.00x | 1.00x |
| 2048 | MoD c=0.125 | 9.00 | 1.33x | 1.56 | 6.43x | 1.48 | 6.75x | 8.00x |
| 4096 | MoD c=0.125 | 9.00 | 2.10x | - | - | - | - | 8.00x |
"""
    rows = parse(table)["rows"]
    assert rows[2048] == {"c": [0.125], "eager": [1.33], "graph": [6.43], "first": [6.75]}
    assert rows[4096]["graph"] == [None] and rows[4096]["first"] == [None]
