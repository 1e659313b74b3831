"""Tokenize documents into megatron-core indexed datasets (.bin/.idx), and the CLI.

Inputs: a .txt file is one document; a .jsonl file has one JSON object per line with a
string "text" field (one document per line; blank lines are skipped). Each document is
written as one sequence of its token ids followed by the EOD token. Next to
PREFIX.bin/PREFIX.idx we write PREFIX.json (document/token counts and the tokenizer's
sha256); it is written last and marks the dataset as complete. All files are written
under temporary names first and moved into place, so a crash never leaves a half-written
dataset.

  mod-preprocess --input a.txt b.jsonl --output-prefix out/mydata --tokenizer-model tok.model
  mod-preprocess --input a.txt --output-prefix out/mydata --vocab-size 4096   # trains out/mydata.model
  mod-preprocess --default-corpus --data-dir ./data [--vocab-size 4096]
  mod-preprocess --corpus debian-docs --data-dir ./data      # mod_megatron/data/debian_docs.py

prepare_data() does the whole default pipeline (download, tokenizer, both datasets), cached.
"""

import argparse
import json
import logging
import os
import sys
import time

import numpy

from mod_megatron.data.common import DataError, atomic_output, atomic_write_text
from mod_megatron.data.corpus import prepare_default_corpus
from mod_megatron.data.tokenizer import SPTokenizer, train_tokenizer

logger = logging.getLogger(__name__)


def check_inputs(paths):
    """Fail early (DataError) on inputs that are missing, unreadable or of unknown type."""
    if not paths:
        raise DataError("no input files given")
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"input file not found: {path}")
        if not os.path.isfile(path):
            raise DataError(f"input is not a file: {path}")
        if not os.access(path, os.R_OK):
            raise DataError(f"input file is not readable: {path}")
        if os.path.splitext(path)[1].lower() not in (".txt", ".jsonl"):
            raise DataError(f"unsupported input type: {path} (use .txt or .jsonl)")


def read_documents(path):
    """Yield the documents (str) of one .txt or .jsonl file; DataError (with file:line) on bad input."""
    try:
        if path.lower().endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})")
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
                    yield obj["text"]
        else:
            with open(path, encoding="utf-8", newline="") as f:
                yield f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}")


def iter_documents(paths):
    for path in paths:
        yield from read_documents(path)


def dataset_files(prefix):
    """The files that make up an indexed dataset written by this module."""
    return [prefix + ".bin", prefix + ".idx", prefix + ".json"]


def is_up_to_date(prefix, tokenizer):
    """True if PREFIX.{bin,idx,json} exist and were made with this tokenizer (same sha256)."""
    if not all(os.path.isfile(p) for p in dataset_files(prefix)):
        return False
    try:
        with open(prefix + ".json", encoding="utf-8") as f:
            return json.load(f).get("tokenizer_sha256") == tokenizer.sha256
    except (OSError, ValueError):
        return False


def build_indexed_dataset(inputs, output_prefix, tokenizer):
    """Tokenize the documents of `inputs` into OUTPUT_PREFIX.bin/.idx (+ .json); returns the
    stats dict written to the .json. Empty documents are skipped."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    check_inputs(inputs)
    if os.path.exists(output_prefix + ".json"):  # the completion marker goes first, comes last
        os.remove(output_prefix + ".json")
    dtype = DType.optimal_dtype(tokenizer.vocab_size)  # uint16 below 65500 tokens
    stats = {"documents": 0, "tokens": 0, "skipped_empty": 0, "max_token_id": -1}
    t0 = time.time()
    with atomic_output(output_prefix + ".bin") as tmp_bin, \
            atomic_output(output_prefix + ".idx") as tmp_idx:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        try:
            for text in iter_documents(inputs):
                if not text:
                    stats["skipped_empty"] += 1
                    continue
                ids = tokenizer.tokenize(text) + [tokenizer.eod]
                builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                stats["documents"] += 1
                stats["tokens"] += len(ids)
                stats["max_token_id"] = max(stats["max_token_id"], max(ids))
        finally:
            builder.data_file.close()
        if stats["documents"] == 0:
            raise DataError(f"no non-empty documents in {', '.join(inputs)}")
        builder.finalize(tmp_idx)
    stats.update(
        tokenizer_model=tokenizer.model_path, tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size, dtype=numpy.dtype(dtype).name,
        inputs=[os.path.abspath(p) for p in inputs], seconds=round(time.time() - t0, 2),
    )
    atomic_write_text(output_prefix + ".json", json.dumps(stats, indent=2) + "\n")
    logger.info("wrote %s.{bin,idx}: %d documents, %d tokens (%.1fs)", output_prefix,
                stats["documents"], stats["tokens"], stats["seconds"])
    return stats


def data_paths(data_dir, vocab_size):
    """Where prepare_data puts the tokenizer and the two datasets for a given vocab size."""
    return {
        "tokenizer_model": os.path.join(data_dir, "tokenizer", f"spm_bpe{vocab_size}.model"),
        "train_prefix": os.path.join(data_dir, "tokens", f"shakespeare_bpe{vocab_size}"),
        "heldout_prefix": os.path.join(data_dir, "tokens", f"kjv_bpe{vocab_size}"),
    }


def prepare_data(data_dir="data", vocab_size=4096):
    """Default corpus end to end: download + JSONL, tokenizer training, .bin/.idx for the
    Shakespeare train set and the KJV held-out set. Cached: a second call only checks that
    the outputs exist. Returns {"tokenizer_model", "train_prefix", "heldout_prefix"}."""
    paths = data_paths(data_dir, vocab_size)
    corpus = prepare_default_corpus(data_dir)
    if not os.path.isfile(paths["tokenizer_model"]):
        logger.info("training a %d-token SentencePiece BPE model on %s", vocab_size, corpus["train"])
        train_tokenizer(read_documents(corpus["train"]), paths["tokenizer_model"], vocab_size)
    tokenizer = SPTokenizer(paths["tokenizer_model"])
    for source, prefix in ((corpus["train"], paths["train_prefix"]),
                           (corpus["heldout"], paths["heldout_prefix"])):
        if not is_up_to_date(prefix, tokenizer):
            build_indexed_dataset([source], prefix, tokenizer)
    return paths


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="mod-preprocess",
        description="Tokenize .txt/.jsonl documents into megatron-core .bin/.idx datasets.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input", nargs="+", metavar="FILE",
                      help=".txt (one document per file) or .jsonl ({'text': ...} per line)")
    mode.add_argument("--default-corpus", action="store_true",
                      help="download and prepare Shakespeare (train) + KJV (held-out)")
    mode.add_argument("--corpus", choices=["default", "debian-docs"],
                      help="a named corpus: default (= --default-corpus) or debian-docs (Debian "
                           "python/linux/perl docs via apt-get, KJV held-out; vocab default 8192)")
    p.add_argument("--output-prefix", help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--tokenizer-model", help="SentencePiece model from this package")
    p.add_argument("--vocab-size", type=int,
                   help="train a new tokenizer of this size (saved as PREFIX.model) when "
                        "--tokenizer-model is not given; default-corpus vocab (default 4096)")
    p.add_argument("--data-dir", default="data", help="data directory for --default-corpus / --corpus")
    p.add_argument("--deb-dir", help="debian-docs: where the .deb files are or go (default DATA_DIR/downloads/debian)")
    args = p.parse_args(argv)
    if args.input and not args.output_prefix:
        p.error("--input needs --output-prefix")
    if args.input and not (args.tokenizer_model or args.vocab_size):
        p.error("--input needs --tokenizer-model (or --vocab-size to train one)")
    if args.vocab_size is not None and args.vocab_size < 300:
        p.error("--vocab-size must be at least 300 (256 byte pieces + specials + merges)")
    return args


def run(args):
    if args.corpus == "debian-docs":
        from mod_megatron.data.debian_docs import prepare_debian_docs

        paths = prepare_debian_docs(args.data_dir, args.vocab_size or 8192, args.deb_dir)
        for key, value in paths.items():
            print(f"{key}: {value}")
        return
    if args.default_corpus or args.corpus == "default":
        paths = prepare_data(args.data_dir, args.vocab_size or 4096)
        for key, value in paths.items():
            print(f"{key}: {value}")
        return
    check_inputs(args.input)
    model = args.tokenizer_model
    if model is None or (not os.path.exists(model) and args.vocab_size):
        model = model or args.output_prefix + ".model"
        train_tokenizer(iter_documents(args.input), model, args.vocab_size)
        print(f"trained tokenizer: {model}")
    stats = build_indexed_dataset(args.input, args.output_prefix, SPTokenizer(model))
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['documents']} documents, "
          f"{stats['tokens']} tokens, vocab {stats['vocab_size']}")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
