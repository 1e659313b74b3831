"""mod-preprocess: documents -> .bin/.idx with EOD, exact read-back, atomic writes, clear errors."""

import json
import os
import subprocess
import sys

import numpy
import pytest

from mod_megatron.data import preprocess
from mod_megatron.data.common import DataError
from mod_megatron.data.preprocess import build_indexed_dataset, main

DOCS = ["First document.\nWith two lines.\n", "Second\tdocument 42 😀", "", "Third \u2581 one"]


@pytest.fixture
def inputs(tmp_path):
    txt = tmp_path / "one.txt"
    txt.write_text(DOCS[0], encoding="utf-8")
    jsonl = tmp_path / "more.jsonl"
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[1:])]
    jsonl.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    return [str(txt), str(jsonl)]


def read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return ds, [ds[i].tolist() for i in range(len(ds))]


def test_exact_token_ids(tmp_path, inputs, tokenizer):
    prefix = str(tmp_path / "out" / "small")
    stats = build_indexed_dataset(inputs, prefix, tokenizer)
    ds, seqs = read_back(prefix)
    expected = [tokenizer.tokenize(d) + [tokenizer.eod] for d in DOCS if d]  # empty doc skipped
    assert seqs == expected
    assert ds.index.dtype == numpy.uint16
    assert [tokenizer.detokenize(s) for s in seqs] == [d for d in DOCS if d]
    assert stats["documents"] == 3 and stats["skipped_empty"] == 1
    assert stats["tokens"] == sum(map(len, expected))
    with open(prefix + ".json") as f:
        assert json.load(f)["tokenizer_sha256"] == tokenizer.sha256
    assert sorted(os.listdir(tmp_path / "out")) == ["small.bin", "small.idx", "small.json"]


def test_default_corpus_read_back(prepared, tokenizer, corpus_docs):
    ds, _ = read_back(prepared["heldout_prefix"])
    assert len(ds) == len(corpus_docs["heldout"]) == 66
    for i in (0, 65):
        assert ds[i].tolist() == tokenizer.tokenize(corpus_docs["heldout"][i]) + [tokenizer.eod]


def test_crash_leaves_no_partial_files(tmp_path, inputs, prepared):
    from mod_megatron.data.tokenizer import SPTokenizer

    class Flaky(SPTokenizer):
        calls = 0

        def tokenize(self, text):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing
            return super().tokenize(text)

    with pytest.raises(KeyboardInterrupt):
        build_indexed_dataset(inputs, str(tmp_path / "crash"), Flaky(prepared["tokenizer_model"]))
    assert sorted(os.listdir(tmp_path)) == ["more.jsonl", "one.txt"]


def test_missing_input(tmp_path, tokenizer):
    with pytest.raises(DataError, match="input file not found: .*nope.txt"):
        build_indexed_dataset([str(tmp_path / "nope.txt")], str(tmp_path / "x"), tokenizer)


def test_bad_jsonl_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        build_indexed_dataset([str(bad)], str(tmp_path / "x"), tokenizer)
    bad.write_text('{"text": "ok"}\n{"txt": "no text key"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with a string 'text'"):
        build_indexed_dataset([str(bad)], str(tmp_path / "x"), tokenizer)
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()


def test_bad_utf8_and_unknown_type(tmp_path, tokenizer):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not valid UTF-8"):
        build_indexed_dataset([str(tmp_path / "latin1.txt")], str(tmp_path / "x"), tokenizer)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported input type"):
        build_indexed_dataset([str(tmp_path / "data.csv")], str(tmp_path / "x"), tokenizer)


def test_main_errors_exit_2(tmp_path, prepared, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    model = prepared["tokenizer_model"]
    for argv, expected in [
        (["--input", str(tmp_path / "missing.txt")], "input file not found"),
        (["--input", str(bad)], "bad.jsonl:2: invalid JSON"),
    ]:
        code = main(argv + ["--output-prefix", str(tmp_path / "o"), "--tokenizer-model", model])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and expected in err
        assert "Traceback" not in err and err.count("\n") == 1


def test_main_trains_tokenizer_next_to_output(tmp_path, corpus_docs, capsys):
    src = tmp_path / "plays.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_docs["train"][:3]))
    prefix = tmp_path / "out" / "plays"
    assert main(["--input", str(src), "--output-prefix", str(prefix), "--vocab-size", "512"]) == 0
    assert (tmp_path / "out" / "plays.model").is_file()
    from mod_megatron.data.tokenizer import SPTokenizer

    tok = SPTokenizer(str(tmp_path / "out" / "plays.model"))
    _, seqs = read_back(str(prefix))
    assert tok.vocab_size == 512 and tok.detokenize(seqs[1]) == corpus_docs["train"][1]


def test_console_script_default_corpus(prepared):
    """The real `mod-preprocess` entry point; the data dir is already prepared (cache hit)."""
    exe = os.path.join(os.path.dirname(sys.executable), "mod-preprocess")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "mod_megatron.data.preprocess"]
    proc = subprocess.run(cmd + ["--default-corpus", "--data-dir", prepared["data_dir"]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"train_prefix: {prepared['train_prefix']}" in proc.stdout


def test_prepare_data_is_cached(prepared):
    files = [prepared[k] + ext for k in ("train_prefix", "heldout_prefix")
             for ext in (".bin", ".idx", ".json")] + [prepared["tokenizer_model"]]
    before = {f: os.stat(f).st_mtime_ns for f in files}
    assert preprocess.prepare_data(prepared["data_dir"], 4096) == {
        k: prepared[k] for k in ("tokenizer_model", "train_prefix", "heldout_prefix")}
    assert {f: os.stat(f).st_mtime_ns for f in files} == before
