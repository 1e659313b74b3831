"""mod-convert reshard: the same model at another TP / PP / EP layout, checked by its logits.

The sources are real checkpoints (the Trainer, 2 steps, optimizer included) written at TP=2, PP=2 and
EP=2. Each reshard runs its target layout's ranks itself; the logits of the held-out batch are then
computed at the source and at the target layout (tests/distributed/spawn.run_layout) and compared.
Measured on CPU/fp32: a TP=2 -> TP=1 -> TP=2 round trip gives bit-identical logits (0.0), TP=2 vs
TP=1 differ by 3e-7 (summation order), PP=2 vs PP=1 (through PP=3) and EP=2 vs EP=1 by 0.0.
"""
from __future__ import annotations

import json

import numpy as np

from mod_megatron.convert.cli import main
from tests.convert.convert_helpers import make_checkpoint, outputs_at

LAYOUT_TOL = 1e-5  # the same weights at another layout: only the fp32 summation order changes


def _meta(root):
    latest = (root / "latest").read_text().strip()
    return json.loads((root / f"iter_{int(latest):07d}" / "mod_meta.json").read_text())


def test_tp2_to_tp1_to_tp2_keeps_the_logits(tmp_path, capsys):
    # vocab 100 with divisor 128 pads to 256 rows at TP=2 but 128 at TP=1: reshard keeps 256.
    src = make_checkpoint(tmp_path / "src", "--model.vocab_size=100", "--model.make_vocab_size_divisible_by=128",
                          world_size=2, tp=2)
    assert main(["reshard", "--checkpoint", str(src), "--output", str(tmp_path / "tp1"), "--tp", "1", "--pp", "1",
                 "--tokenizer", str(tmp_path / "src" / "tokenizer.model")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["reshard", "--checkpoint", str(tmp_path / "tp1"), "--output", str(tmp_path / "tp2"),
                 "--tp", "2", "--pp", "1"]) == 0
    before, tp1, after = (outputs_at(src, 2, tp=2), outputs_at(tmp_path / "tp1"),
                          outputs_at(tmp_path / "tp2", 2, tp=2))
    assert before.shape == tp1.shape == after.shape == (8, 32, 256)
    assert np.array_equal(before, after)  # a round trip is lossless
    d_tp = float(np.abs(tp1 - before).max())
    print(f"max |logit TP=1 - logit TP=2| = {d_tp:.2e}")
    assert d_tp < LAYOUT_TOL

    src_meta, meta = _meta(src), _meta(tmp_path / "tp1")
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 1, "ep": 1, "vpp": None}
    assert meta["model_only"] and meta["resharded_from"] == str(src / "iter_0000002")
    assert meta["source_layout"]["tp"] == 2
    assert meta["config"]["model"]["make_vocab_size_divisible_by"] == 256
    for key in ("iteration", "consumed_samples", "tokenizer_sha256"):
        assert meta[key] == src_meta[key]
    assert _meta(tmp_path / "tp2")["layout"]["tp"] == 2


def test_pp2_to_pp3_to_pp1_keeps_the_logits(tmp_path):
    """PP=3 does not divide the 4 layers: the target ranks use the cost-aware stage split."""
    src = make_checkpoint(tmp_path / "src", world_size=2, pp=2)
    assert main(["reshard", "--checkpoint", str(src), "--output", str(tmp_path / "pp3"), "--tp", "1", "--pp", "3"]) == 0
    assert main(["reshard", "--checkpoint", str(tmp_path / "pp3"), "--output", str(tmp_path / "pp1"), "--tp", "1",
                 "--pp", "1"]) == 0
    before, after = outputs_at(src, 2, pp=2), outputs_at(tmp_path / "pp1")
    d = float(np.abs(after - before).max())
    print(f"max |logit PP=1 - logit PP=2| = {d:.2e}")
    assert d < LAYOUT_TOL
    pp3 = _meta(tmp_path / "pp3")
    assert pp3["layout"]["pp"] == 3 and pp3["config"]["parallel"]["pipeline_split"] == "cost"
    assert pp3["world_size"] == 3 and _meta(tmp_path / "pp1")["layout"]["pp"] == 1


def test_ep2_mode_checkpoint_to_ep1_keeps_the_logits(tmp_path):
    moe = ["--moe.num_experts=4", "--moe.topk=2", "--moe.ffn_hidden_size=64", "--moe.ep=2"]
    src = make_checkpoint(tmp_path / "src", *moe, world_size=2, ep=2)
    assert main(["reshard", "--checkpoint", str(src), "--output", str(tmp_path / "ep1"), "--tp", "1", "--pp", "1",
                 "--ep", "1"]) == 0
    before, after = outputs_at(src, 2, ep=2), outputs_at(tmp_path / "ep1")
    d = float(np.abs(after - before).max())
    print(f"max |logit EP=1 - logit EP=2| = {d:.2e}")
    assert d < LAYOUT_TOL
    meta = _meta(tmp_path / "ep1")
    assert meta["layout"]["ep"] == 1 and meta["config"]["moe"]["ep"] == 1
