"""Train / validation / held-out GPT datasets via megatron-core's BlendedMegatronDatasetBuilder.

  train, valid  <- the train prefix (Shakespeare), split by document with `split`
  heldout       <- the held-out prefix (KJV), all of it (megatron's "test" split)

The third number of `split` (megatron's test share) is ignored: the test split is the
held-out corpus. Two builders are used: one with blend + split "train,valid,0", one with
blend_per_split = [None, None, heldout].

Samples are dicts of int64/float tensors of length seq_length: tokens, labels (tokens
shifted by one), loss_mask, position_ids (no attention_mask: the model uses causal SDPA).

The builder works with torch.distributed uninitialized (everything is built locally) and
with an initialized process group (rank 0 builds and caches the indices first, then the
other ranks for which is_built_on_rank() is True load them; the rest get None). The
document/sample/shuffle indices are cached as .npy files in cache_dir (default:
<train prefix dir>/index_cache), keyed by an MD5 of the configuration.
"""

import json
import os
import struct

import numpy

from mod_megatron.data.common import DataError
from mod_megatron.data.preprocess import prepare_data  # noqa: F401  (re-exported)
from mod_megatron.data.tokenizer import SPTokenizer

__all__ = ["build_datasets", "check_indexed_dataset", "prepare_data"]


def _always_true():
    return True


def _create_hint(prefix):
    return (f"create it with `mod-preprocess --default-corpus --data-dir DIR` (default corpus) "
            f"or `mod-preprocess --input FILES --output-prefix {prefix} --tokenizer-model MODEL`")


def check_indexed_dataset(prefix, tokenizer):
    """Validate PREFIX.bin/.idx against the tokenizer; returns its number of sequences
    (= documents for data written by mod-preprocess; megatron splits by sequence).

    DataError if a file is missing, if PREFIX.json records another tokenizer, or if a token
    id in the data is >= the tokenizer's vocab size."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for path in (prefix + ".bin", prefix + ".idx"):
        if not os.path.isfile(path):
            raise DataError(f"missing dataset file {path}; {_create_hint(prefix)}")
    meta_path = prefix + ".json"
    if os.path.isfile(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except ValueError as e:
            raise DataError(f"{meta_path} is corrupt ({e}); re-run mod-preprocess") from None
        sha = meta.get("tokenizer_sha256")
        if sha and sha != tokenizer.sha256:
            raise DataError(f"{prefix}.bin was tokenized with another tokenizer (sha256 {sha[:12]}"
                            f"..., {meta.get('tokenizer_model')}) than {tokenizer.model_path} "
                            f"(sha256 {tokenizer.sha256[:12]}...); re-run mod-preprocess")
    _check_index_header(prefix)
    try:
        dataset = IndexedDataset(prefix)
    except (AssertionError, ValueError, OSError, struct.error) as e:
        raise DataError(f"cannot read indexed dataset {prefix} ({type(e).__name__}: {e}); {_create_hint(prefix)}")
    index = dataset.index
    want = (int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
            if index.sequence_count else 0)
    have = os.path.getsize(prefix + ".bin")
    if have != want:
        raise DataError(f"{prefix}.bin has {have} bytes but {prefix}.idx describes {want} (truncated, or "
                        f"the two files do not belong together); {_create_hint(prefix)}")
    tokens = numpy.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r")
    max_id = int(tokens.max()) if tokens.size else -1
    if max_id >= tokenizer.vocab_size:
        raise DataError(f"{prefix}.bin has token id {max_id} but the tokenizer "
                        f"{tokenizer.model_path} has only {tokenizer.vocab_size} tokens; "
                        "use the tokenizer the data was made with")
    return int(dataset.sequence_lengths.shape[0])


def _check_index_header(prefix):
    """DataError for a .idx that is not megatron's or is shorter than its header says (checked here:
    megatron's reader fails on them with a noisy traceback from IndexedDataset.__del__)."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER

    path = prefix + ".idx"
    with open(path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _INDEX_HEADER:
        raise DataError(f"{path} is not a megatron index ({'truncated header' if len(head) < 34 else 'bad magic'}); "
                        f"{_create_hint(prefix)}")
    sequences, documents = struct.unpack("<QQ", head[18:34])
    want = 34 + sequences * (4 + 8) + documents * 8
    have = os.path.getsize(path)
    if have < want:
        raise DataError(f"{path} is truncated ({have} bytes, its header needs {want}); {_create_hint(prefix)}")


def _parse_split(split, num_seqs, prefix):
    """'949,50,1' -> '949,50,0' (test share dropped); DataError if train/valid would get no
    sequence (checked when num_seqs is known)."""
    try:
        weights = [float(w) for w in split.split(",")]
    except ValueError:
        weights = []
    if len(weights) not in (2, 3) or min(weights) < 0 or weights[0] <= 0:
        raise DataError(f"bad split {split!r}: expected 'train,valid[,test]' weights, e.g. '949,50,1'")
    train, valid = weights[0], weights[1]
    if num_seqs is None:
        return f"{train:g},{valid:g},0"
    n_train = int(round(train / (train + valid) * num_seqs))
    if n_train == 0 or (valid > 0 and n_train == num_seqs):
        raise DataError(f"split {split!r} of the {num_seqs} sequences in {prefix} leaves the "
                        f"{'train' if n_train == 0 else 'validation'} split empty; "
                        "use more documents or another split")
    return f"{train:g},{valid:g},0"


def _config(seed, seq_length, tokenizer, cache_dir, **blend):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tokenizer,
        path_to_cache=cache_dir,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        **blend,
    )


def build_datasets(data_prefix_train, data_prefix_heldout, seq_length, seed, tokenizer,
                   num_samples=(None, None, None), split="949,50,1", cache_dir=None,
                   is_built_on_rank=_always_true):
    """Build (train_ds, valid_ds, heldout_ds) GPTDatasets.

    tokenizer: an SPTokenizer or the path of its model file.
    num_samples: samples per split (None = one epoch); more than one epoch repeats the data.
    Must be called on every rank when torch.distributed is initialized. A dataset is None
    where is_built_on_rank() is False (distributed) or where valid's split weight is 0.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset
    import torch.distributed as dist

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = SPTokenizer(tokenizer)
    if seq_length < 1:
        raise DataError(f"seq_length must be positive, got {seq_length}")
    if len(num_samples) != 3:
        raise DataError(f"num_samples must be (train, valid, heldout), got {num_samples!r}")
    num_seqs = None  # ranks that build nothing need not see the files
    if not dist.is_initialized() or is_built_on_rank():
        num_seqs = check_indexed_dataset(data_prefix_train, tokenizer)
        check_indexed_dataset(data_prefix_heldout, tokenizer)
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(data_prefix_train)), "index_cache")

    train_valid = _config(seed, seq_length, tokenizer, cache_dir,
                          blend=([data_prefix_train], None),
                          split=_parse_split(split, num_seqs, data_prefix_train))
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples[0], num_samples[1], None], is_built_on_rank, train_valid
    ).build()

    heldout = _config(seed, seq_length, tokenizer, cache_dir,
                      blend_per_split=[None, None, ([data_prefix_heldout], None)])
    _, _, heldout_ds = BlendedMegatronDatasetBuilder(
        GPTDataset, [None, None, num_samples[2]], is_built_on_rank, heldout
    ).build()
    return train_ds, valid_ds, heldout_ds
