"""build_datasets: GPT samples, train/valid split of Shakespeare, KJV held-out, cache, errors."""

import json
import multiprocessing
import os
import shutil
import time

import pytest
import torch

from mod_megatron.data.common import DataError
from mod_megatron.data.datasets import build_datasets
from mod_megatron.data.tokenizer import SPTokenizer, train_tokenizer

SEQ = 128


@pytest.fixture(scope="module")
def datasets(prepared, tokenizer, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("index_cache"))
    return build_datasets(prepared["train_prefix"], prepared["heldout_prefix"], SEQ, 1234,
                          tokenizer, num_samples=(5000, None, 100), cache_dir=cache)


def first_segment(tokenizer, sample):
    """Text of the sample's tokens up to the first EOD (so it lies within one document)."""
    ids = sample["tokens"].tolist()
    if tokenizer.eod in ids:
        ids = ids[: ids.index(tokenizer.eod)]
    return tokenizer.detokenize(ids)


def source_of(text, docs):
    return [i for i, d in enumerate(docs) if text in d]


def test_sample_layout(datasets):
    train, valid, heldout = datasets
    assert len(train) >= 5000 and len(heldout) >= 100 and len(valid) > 0
    for ds in datasets:
        for idx in (0, len(ds) // 2, len(ds) - 1):
            s = ds[idx]
            assert sorted(s) == ["labels", "loss_mask", "position_ids", "tokens"]
            assert all(v.shape == (SEQ,) for v in s.values())
            assert s["tokens"].dtype == torch.int64 and s["labels"].dtype == torch.int64
            assert torch.equal(s["tokens"][1:], s["labels"][:-1])  # labels = tokens shifted by one
            assert torch.equal(s["position_ids"], torch.arange(SEQ))
            assert torch.all(s["loss_mask"] == 1.0)


def test_samples_follow_the_token_stream(datasets, prepared):
    """Each sample is SEQ + 1 consecutive tokens of the (document-shuffled) stream."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    train = datasets[0]
    docs = IndexedDataset(prepared["train_prefix"])
    for idx in range(0, 50, 7):
        s = train[idx]
        window = s["tokens"].tolist() + [s["labels"][-1].item()]
        first_doc = window.index(3) + 1 if 3 in window else len(window)
        head = window[:first_doc]
        assert any(_contains(docs[i].tolist(), head) for i in range(len(docs)))


def _contains(seq, sub):
    n = len(sub)
    return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1) if seq[i] == sub[0])


def test_train_valid_split_and_kjv_heldout(datasets, tokenizer, corpus_docs):
    train, valid, heldout = datasets
    plays, bible = corpus_docs["train"], corpus_docs["heldout"]
    for ds, allowed in ((train, range(0, 40)), (valid, range(40, 42))):  # 949:50 of 42 docs
        for idx in range(0, len(ds), max(1, len(ds) // 20)):
            text = first_segment(tokenizer, ds[idx])
            if len(text) > 40:
                found = source_of(text, plays)
                assert found and set(found) <= set(allowed), (idx, text[:80])
    for idx in range(0, len(heldout), 10):
        text = first_segment(tokenizer, heldout[idx])
        if len(text) > 40:
            assert source_of(text, bible) and not source_of(text, plays)
    assert heldout.dataset_path.endswith("kjv_bpe4096")


def test_index_cache_is_reused(prepared, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    args = (prepared["train_prefix"], prepared["heldout_prefix"], 64, 7, tokenizer)
    t0 = time.time()
    first = build_datasets(*args, num_samples=(20000, 100, 100), cache_dir=str(cache))
    cold = time.time() - t0
    files = {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)}
    assert len(files) == 12  # 3 splits x (description, document/sample/shuffle index)
    t0 = time.time()
    second = build_datasets(*args, num_samples=(20000, 100, 100), cache_dir=str(cache))
    warm = time.time() - t0
    assert {f: os.stat(cache / f).st_mtime_ns for f in os.listdir(cache)} == files
    for a, b in zip(first, second):
        assert len(a) == len(b) and torch.equal(a[5]["tokens"], b[5]["tokens"])
    print(f"index build: cold {cold:.3f}s, warm {warm:.3f}s")
    # another seed -> another shuffle, in new cache files
    other = build_datasets(*args[:3], 8, tokenizer, num_samples=(20000, 100, 100), cache_dir=str(cache))
    assert len(os.listdir(cache)) == 24
    assert not torch.equal(other[0][5]["tokens"], first[0][5]["tokens"])


def test_tokenizer_path_and_default_cache_dir(prepared):
    train, _, _ = build_datasets(prepared["train_prefix"], prepared["heldout_prefix"], 32, 1,
                                 prepared["tokenizer_model"], num_samples=(10, 10, 10))
    assert len(train) > 0
    assert os.path.isdir(os.path.join(os.path.dirname(prepared["train_prefix"]), "index_cache"))


def test_missing_prefix_error(prepared, tokenizer, tmp_path):
    missing = str(tmp_path / "nothing_here")
    with pytest.raises(DataError) as err:
        build_datasets(missing, prepared["heldout_prefix"], SEQ, 1, tokenizer)
    msg = str(err.value)
    assert missing + ".bin" in msg and "mod-preprocess" in msg and "\n" not in msg


def test_vocab_smaller_than_data_error(prepared, corpus_docs, tmp_path):
    small = SPTokenizer(train_tokenizer(corpus_docs["train"][:1], str(tmp_path / "s.model"), 400))
    # PREFIX.json records the real tokenizer -> mismatch is reported first
    with pytest.raises(DataError, match="tokenized with another tokenizer"):
        build_datasets(prepared["train_prefix"], prepared["heldout_prefix"], SEQ, 1, small)
    # data without PREFIX.json (made elsewhere): the token id range is checked
    for name in ("train_prefix", "heldout_prefix"):
        for ext in (".bin", ".idx"):
            shutil.copy(prepared[name] + ext, tmp_path / (name + ext))
    with pytest.raises(DataError, match="has token id 4095 but the tokenizer .* has only 400 tokens"):
        build_datasets(str(tmp_path / "train_prefix"), str(tmp_path / "heldout_prefix"), SEQ, 1, small)


@pytest.mark.parametrize("split, match", [("abc", "bad split"), ("0,1", "bad split"),
                                          ("100000,1", "leaves the validation split empty")])
def test_bad_split(prepared, tokenizer, split, match):
    with pytest.raises(DataError, match=match):
        build_datasets(prepared["train_prefix"], prepared["heldout_prefix"], SEQ, 1, tokenizer,
                       split=split)


def test_no_validation_split(prepared, tokenizer, tmp_path):
    train, valid, heldout = build_datasets(prepared["train_prefix"], prepared["heldout_prefix"], SEQ,
                                           1, tokenizer, split="1,0,0", cache_dir=str(tmp_path))
    assert valid is None and len(train) > 0 and len(heldout) > 0


def _dist_worker(rank, world, init_file, prepared, cache_dir, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        datasets = build_datasets(prepared["train_prefix"], prepared["heldout_prefix"], SEQ, 99,
                                  prepared["tokenizer_model"], num_samples=(300, 20, 20),
                                  cache_dir=cache_dir)
        result = [None if d is None else [len(d), d[3]["tokens"].tolist()] for d in datasets]
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_distributed_two_ranks(prepared, tmp_path):
    """With a gloo process group, rank 0 builds the index cache first, rank 1 then loads it."""
    ctx = multiprocessing.get_context("spawn")
    args = (2, str(tmp_path / "init"), prepared, str(tmp_path / "cache"), str(tmp_path))
    procs = [ctx.Process(target=_dist_worker, args=(rank,) + args) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    with open(tmp_path / "0.json") as f0, open(tmp_path / "1.json") as f1:
        r0, r1 = json.load(f0), json.load(f1)
    assert r0 == r1 and all(r is not None for r in r0)


def test_initialized_group_and_is_built_on_rank(prepared, tokenizer, tmp_path):
    """Works inside an initialized (1-rank gloo) group; is_built_on_rank=False gives None."""
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                                world_size=1)
    try:
        args = (prepared["train_prefix"], prepared["heldout_prefix"], SEQ, 5, tokenizer)
        built = build_datasets(*args, num_samples=(100, 10, 10), cache_dir=str(tmp_path / "c"))
        assert all(d is not None and len(d) > 0 for d in built)
        skipped = build_datasets(*args, num_samples=(100, 10, 10), cache_dir=str(tmp_path / "c"),
                                 is_built_on_rank=lambda: False)
        assert skipped == (None, None, None) or list(skipped) == [None, None, None]
    finally:
        if own_group:
            dist.destroy_process_group()
