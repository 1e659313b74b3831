"""Bad input stops before training with one `error:` line and exit status 2, and changes nothing on
disk (data, tokenizer, checkpoints). Runs the real CLI entry point, mod_megatron.training.cli.main."""
from __future__ import annotations

import os
import shutil
import warnings

import pytest

from reliability_helpers import ITERS, SMALL


def _snapshot(*dirs):
    return {os.path.join(r, n): (os.path.getsize(os.path.join(r, n)), os.path.getmtime(os.path.join(r, n)))
            for d in dirs for r, _, names in os.walk(d) for n in names}


@pytest.fixture
def custom(prepared, tmp_path):
    """A private copy of the Shakespeare dataset and its tokenizer, used as data.corpus=custom."""
    d = tmp_path / "data"
    d.mkdir()
    src = prepared["train_prefix"]
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(src + ext, d / f"train{ext}")
    shutil.copy(prepared["tokenizer_model"], d / "tok.model")
    return {"dir": d, "prefix": str(d / "train"), "tokenizer": str(d / "tok.model")}


def _main(capsys, custom, ckpt_dir, *overrides, config="configs/tiny-cpu.yaml"):
    from mod_megatron.training import cli

    args = ["--config", config, *SMALL, "--data.corpus=custom", f"--data.train_prefix={custom['prefix']}",
            f"--data.tokenizer_model={custom['tokenizer']}", f"--checkpoint.dir={ckpt_dir}",
            f"--logging.dir={ckpt_dir}_log", f"--train.iters={ITERS}", "--train.eval_interval=0",
            *overrides]
    before = _snapshot(custom["dir"], ckpt_dir)
    with warnings.catch_warnings():  # megatron's import-time notices are not ours to count
        warnings.simplefilter("ignore")
        code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    after = _snapshot(custom["dir"], ckpt_dir)
    assert {k: after.get(k) for k in before} == before and not os.path.exists(f"{ckpt_dir}_log")
    assert all("/index_cache/" in k for k in set(after) - set(before))  # megatron's sample-index cache only
    return err[0]


def test_missing_bin(capsys, custom, ckpt_copy):
    os.remove(custom["prefix"] + ".bin")
    assert "missing dataset file" in _main(capsys, custom, ckpt_copy)


def test_truncated_bin(capsys, custom, ckpt_copy):
    os.truncate(custom["prefix"] + ".bin", 1000)
    assert f"{custom['prefix']}.bin has 1000 bytes but" in _main(capsys, custom, ckpt_copy)


@pytest.mark.parametrize("damage, needle", [("truncate", "is truncated"), ("garbage", "not a megatron index")])
def test_corrupt_idx(capsys, custom, ckpt_copy, damage, needle):
    path = custom["prefix"] + ".idx"
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 16)
    else:
        open(path, "wb").write(b"\0" * os.path.getsize(path))
    assert needle in _main(capsys, custom, ckpt_copy)


def test_tokenizer_not_the_datas(capsys, custom, ckpt_copy, tmp_path):
    from mod_megatron.data.tokenizer import train_tokenizer

    other = str(tmp_path / "other.model")
    train_tokenizer(["to be or not to be, that is the question\n" * 50], other, vocab_size=300)
    custom["tokenizer"] = other
    assert "was tokenized with another tokenizer" in _main(capsys, custom, ckpt_copy)
    os.remove(custom["prefix"] + ".json")  # without the record, the token ids give it away
    line = _main(capsys, custom, ckpt_copy)
    assert "but the tokenizer" in line and "has only 300 tokens" in line


@pytest.mark.parametrize("kind, needle", [("directory", "cannot read config file"),
                                          ("binary", "is not a text (UTF-8) YAML file"),
                                          ("yaml", "is not valid YAML"), ("missing", "config file not found")])
def test_unreadable_config(capsys, custom, ckpt_copy, tmp_path, kind, needle):
    path = tmp_path / "cfg.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\x80\x81\xfe\xff" * 10)
    elif kind == "yaml":
        path.write_text("train:\n  iters: [1,\n")
    assert needle in _main(capsys, custom, ckpt_copy, config=str(path))


def test_checkpoint_of_another_shape(capsys, custom, ckpt_copy):
    line = _main(capsys, custom, ckpt_copy, "--model.hidden_size=128")
    assert "another model shape" in line and "hidden_size: checkpoint 64 vs config 128" in line


def test_no_usable_checkpoint(capsys, custom, ckpt_copy):
    for it in (ITERS - 4, ITERS):
        os.remove(ckpt_copy / f"iter_{it:07d}" / "common.pt")
    line = _main(capsys, custom, ckpt_copy)
    assert "no usable checkpoint" in line and "common.pt is missing" in line
