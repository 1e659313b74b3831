"""SPTokenizer: exact tokenize -> detokenize round trip, special ids, megatron interface."""

import hashlib
import pickle
import random

import numpy
import pytest
import torch

from mod_megatron.data import tokenizer as tok_mod
from mod_megatron.data.common import DataError
from mod_megatron.data.tokenizer import SPTokenizer, train_tokenizer

TRICKY = [
    "",
    "\n",
    "\n\n\n",
    "a\nb\r\nc\rd",
    "\tindented\twith\ttabs\t",
    "   leading and trailing spaces   ",
    "multiple     spaces  between",
    " ",
    "line one\n    four-space indent\n\ttab indent\n",
    "digits 0123456789 3.14159 1,000,000",
    "unicode: café naïve Ωμέγα Привет 中文 日本語 한국어",
    "emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦 flags: 🇬🇧",
    "combining: e\u0301 a\u0308 zero-width:\u200b| bom:\ufeff| nbsp:\u00a0| ideographic:\u3000|",
    "control chars: \x00 \x01 \x07 \x1b[31m \x7f",
    "sentencepiece meta space: \u2581 and \u2581\u2581x and x\u2581",
    "\u2581",
    "special-looking text: <eod> <s> </s> <unk> <pad> <0x41>",
    "ends with newline\n",
]


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip_tricky(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.unk not in ids
    assert tokenizer.detokenize(ids) == text


def test_roundtrip_random(tokenizer):
    rng = random.Random(0)
    alphabet = list("abcXYZ019 .,;'\"!?-_") + ["\n", "\t", "\r", "  ", "\u2581", "é", "ß",
                                             "中", "😀", "\x00", "\u200b", "<", ">", "\\"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_roundtrip_corpus_samples(tokenizer, corpus_docs):
    rng = random.Random(1)
    for doc in corpus_docs["train"][:3] + corpus_docs["heldout"][:2]:
        assert tokenizer.detokenize(tokenizer.tokenize(doc)) == doc
    for doc in rng.sample(corpus_docs["train"], 10):
        start = rng.randrange(len(doc))
        chunk = doc[start : start + rng.randint(1, 2000)]
        assert tokenizer.detokenize(tokenizer.tokenize(chunk)) == chunk


def test_compression_and_newline_piece(tokenizer, corpus_docs):
    doc = corpus_docs["train"][0]
    ids = tokenizer.tokenize(doc)
    assert len(doc) / len(ids) > 2.5  # BPE merges learned (bytes would be 1.0)
    assert ids.count(tok_mod.NEWLINE) == doc.count("\n")


def test_special_ids_and_interface(tokenizer, prepared):
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

    assert isinstance(tokenizer, MegatronLegacyTokenizer)
    assert tokenizer.vocab_size == 4096
    assert (tokenizer.pad, tokenizer.unk, tokenizer.bos, tokenizer.eod) == (0, 1, 2, 3)
    assert tokenizer.eos == tokenizer.eod
    assert tokenizer.inv_vocab[tokenizer.eod] == "<eod>"
    assert tokenizer.vocab["<eod>"] == tokenizer.eod and len(tokenizer.vocab) == 4096
    assert tokenizer.eod not in tokenizer.tokenize("<eod>")  # text never becomes a special id
    with open(prepared["tokenizer_model"], "rb") as f:
        assert tokenizer.sha256 == hashlib.sha256(f.read()).hexdigest()
    ids = tokenizer.tokenize("Hello, world")
    # numpy arrays and tensors decode too; special ids are dropped
    assert tokenizer.detokenize(numpy.array(ids + [tokenizer.eod], dtype=numpy.uint16)) == "Hello, world"
    assert tokenizer.detokenize(torch.tensor([tokenizer.bos] + ids)) == "Hello, world"


def test_pickle(tokenizer):
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.sha256 == tokenizer.sha256
    assert clone.tokenize("To be, or not to be") == tokenizer.tokenize("To be, or not to be")


def test_training_is_deterministic(tmp_path, corpus_docs, tokenizer):
    path = train_tokenizer(corpus_docs["train"], str(tmp_path / "again.model"), 4096)
    assert SPTokenizer(path).sha256 == tokenizer.sha256


def test_vocab_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="vocab_size=5000"):
        train_tokenizer(["just a few words\n"] * 10, str(tmp_path / "t.model"), 5000)
    assert not (tmp_path / "t.model").exists()


def test_bad_model_files(tmp_path):
    with pytest.raises(DataError, match="cannot read tokenizer model"):
        SPTokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        SPTokenizer(str(tmp_path / "junk.model"))
