"""mod-convert refuses what does not fit, with one `error:` line and exit status 2, and leaves no output.

Refused before anything is written: a truncated or missing shard, another format version, a target
layout the model cannot be split into, expert parallelism without experts, a DeepSpeed checkpoint, a
MoD checkpoint given to dense-to-mod, another tokenizer, an output that already holds a checkpoint.
A failure after the ranks started (a damaged shard without an integrity record) removes what was written.
"""
from __future__ import annotations

import json
import shutil

import pytest

from mod_megatron.convert.cli import main
from tests.convert.convert_helpers import make_checkpoint

ITER = "iter_0000001"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 1-step MoD checkpoint (layers 2 and 4 routed) written by the Trainer on one rank."""
    root = tmp_path_factory.mktemp("refusals")
    return make_checkpoint(root / "src", iters=1)


@pytest.fixture
def ckpt(source, tmp_path):
    """A private copy of the source checkpoint root."""
    dst = tmp_path / "ckpt"
    shutil.copytree(source, dst)
    return dst


def _edit_meta(ckpt, **changes):
    path = ckpt / ITER / "mod_meta.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            meta["config"][section][name] = value
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def _refused(capsys, args, output, expect: str):
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    assert expect in err[0], err[0]
    if output.exists():  # whatever was there: no checkpoint was added to it
        assert not (output / "latest").exists() and not list(output.glob("iter_*"))
    return err[0]


def _shard(ckpt):
    return sorted((ckpt / ITER).glob("*.distcp"))[0]


def test_truncated_shard(ckpt, tmp_path, capsys):
    shard = _shard(ckpt)
    shard.write_bytes(shard.read_bytes()[:1000])
    _refused(capsys, ["reshard", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out"), "--tp", "2",
                      "--pp", "1"], tmp_path / "out", f"{shard.name} is truncated")
    assert not (tmp_path / "out").exists()


def test_missing_shard(ckpt, tmp_path, capsys):
    _shard(ckpt).unlink()
    _refused(capsys, ["dense-to-mod", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out")],
             tmp_path / "out", "is missing")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, args, expect", [
    ({"format_version": 99}, ["--tp", "1", "--pp", "1"], "checkpoint format 99 is not the supported 1"),
    ({}, ["--tp", "3", "--pp", "1"], "to tp=3: it must divide model.num_attention_heads=4"),
    ({"model__num_query_groups": 2}, ["--tp", "4", "--pp", "1"], "to tp=4: it must divide model.num_query_groups=2"),
    ({}, ["--tp", "1", "--pp", "5"], "model.num_layers=4 is fewer than pipeline stages parallel.pp=5"),
    ({}, ["--tp", "1", "--pp", "1", "--ep", "2"], "need moe.num_experts > 0"),
    ({"engine": "deepspeed"}, ["--tp", "1", "--pp", "1"], "convert it with `mod-convert from-deepspeed` first"),
])
def test_reshard_refusals(ckpt, tmp_path, capsys, edit, args, expect):
    _edit_meta(ckpt, **edit)
    _refused(capsys, ["reshard", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out"), *args],
             tmp_path / "out", expect)
    assert not (tmp_path / "out").exists()


def test_dense_to_mod_refuses_a_mod_checkpoint_and_a_bad_setting(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, ["dense-to-mod", "--checkpoint", str(ckpt), "--output", str(out)], out,
             "is already a MoD checkpoint")
    _edit_meta(ckpt, mod__enabled=False)
    _refused(capsys, ["dense-to-mod", "--checkpoint", str(ckpt), "--output", str(out), "--mod.capacity=1.5"], out,
             "mod.capacity must be in (0, 1]")
    _refused(capsys, ["dense-to-mod", "--checkpoint", str(ckpt), "--output", str(out), "--mod.first_routed=9"], out,
             "mod.first_routed must be a layer index in [0, 3], got 9")
    assert not out.exists()


def test_tokenizer_mismatch(ckpt, tmp_path, capsys):
    other = tmp_path / "other.model"
    other.write_bytes(b"another tokenizer\n")
    _refused(capsys, ["reshard", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out"), "--tp", "1",
                      "--pp", "1", "--tokenizer", str(other)], tmp_path / "out", "tokenizer mismatch")


def test_output_holding_a_checkpoint_is_left_alone(ckpt, source, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(source, out)
    before = sorted(p.name for p in out.rglob("*"))
    _refused(capsys, ["reshard", "--checkpoint", str(ckpt), "--output", str(out), "--tp", "1", "--pp", "1"],
             tmp_path / "nothing", "already holds a checkpoint")
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize("precreate", [False, True])
def test_failure_after_the_ranks_started_leaves_no_output(ckpt, tmp_path, capsys, precreate):
    """No integrity record (as in checkpoints of older versions): the damage shows only at load, in the
    ranks, after the output root was created; it is removed again (a pre-existing one is left empty)."""
    _edit_meta(ckpt, files={})
    shard = _shard(ckpt)
    shard.write_bytes(shard.read_bytes()[:1000])
    out = tmp_path / "out"
    if precreate:
        out.mkdir()
    _refused(capsys, ["reshard", "--checkpoint", str(ckpt), "--output", str(out), "--tp", "2", "--pp", "1"], out,
             "cannot load")
    assert (list(out.iterdir()) == []) if precreate else not out.exists()


@pytest.mark.parametrize("command, says", [("reshard", "optimizer moments and RNG states are dropped"),
                                           ("dense-to-mod", "--mod.capacity_warmup_iters")])
def test_help(capsys, command, says):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0 and says in out and "--checkpoint" in out and "--output" in out
