"""The debian-docs corpus without Debian packages: text extraction on a small fake unpacked tree,
POD and HTML conversion, the split order, download errors, and the cached pipeline from a JSONL."""

import hashlib
import json
import os
import subprocess

import pytest

from mod_megatron.data import debian_docs as dd
from mod_megatron.data.common import DataError, DownloadError

PROSE = ("The quick brown fox jumps over the lazy dog while the kernel schedules tasks and the "
         "interpreter reads its configuration files. ") * 4


def write(root, rel, data):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def tree(tmp_path):
    """A fake `dpkg-deb -x` result with one file of every kind the extractor must take or skip."""
    root = str(tmp_path / "pkg")
    html = "usr/share/doc/pkg/html"
    write(root, f"{html}/_sources/guide/intro.rst.txt", "Intro\n=====\n\n" + PROSE)
    write(root, f"{html}/guide/intro.html", f"<html><body><p>{PROSE}</p></body></html>")  # has a source
    write(root, f"{html}/standalone.html",
          "<html><head><title>T</title><style>p {color: red}</style></head><body><nav>menu</nav>"
          f"<h1>Standalone &amp; page</h1><p>{PROSE}</p><script>var x = 1;</script>"
          "<pre>  code line 1\n  code line 2</pre></body></html>")
    write(root, f"{html}/genindex.html", f"<html><body>{PROSE}</body></html>")  # generated index page
    write(root, f"{html}/_static/basic.txt", PROSE)  # Sphinx theme files
    write(root, f"{html}/_images/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    write(root, "usr/share/perl/pod/perlfoo.pod",
          "=encoding utf8\n\n=head1 NAME\n\nperlfoo - B<bold> and C<< $a <=> $b >> in L<perlop|perlop/\"Sort\">\n\n"
          "=for comment\nnot shown\n\n=begin html\n\n<p>not shown</p>\n\n=end html\n\n"
          "=over 4\n\n=item * first\n\n" + PROSE + "E<lt>tagE<gt> X<index term>\n\n=back\n\n"
          "  verbatim C<kept>\n\n=cut\n")
    write(root, "usr/share/doc/pkg/notes.txt", PROSE + "\r\nsecond line\r\n")
    write(root, "usr/share/doc/pkg/notes_copy.txt", PROSE + "\nsecond line\n")  # = notes.txt
    write(root, "usr/share/doc/pkg/binary.txt", b"ELF\0\0\0" + PROSE.encode())
    write(root, "usr/share/doc/pkg/latin1.txt", PROSE.encode() + b"caf\xe9")
    write(root, "usr/share/doc/pkg/short.txt", "too short")
    write(root, "usr/share/doc/pkg/changelog.gz", b"\x1f\x8b" + PROSE.encode())
    write(root, "usr/share/doc/pkg/copyright", PROSE)
    write(root, "usr/share/doc/pkg/html/_sources/translations/it/intro.rst.txt", PROSE)
    write(root, "usr/bin/tool", b"#!/bin/sh\necho hi\n")
    return root


def test_extract_documents_takes_text_and_skips_the_rest(tree):
    docs, stats = dd.extract_documents(tree, "pkg")
    ids = [d["id"] for d in docs]
    assert ids == sorted(ids) and all(i.startswith("pkg:") for i in ids)
    names = sorted(os.path.basename(i) for i in ids)
    assert names == ["intro.rst.txt", "notes.txt", "perlfoo.pod", "standalone.html"]
    assert stats["text"] == 2 and stats["pod"] == 1 and stats["html"] == 1
    assert stats["not_text"] == 2  # NUL bytes, invalid UTF-8
    assert stats["short"] == 1 and stats["duplicate"] == 1
    assert stats["chars"] == sum(len(d["text"]) for d in docs)
    text = {os.path.basename(d["id"]): d["text"] for d in docs}
    assert text["notes.txt"] == PROSE + "\nsecond line\n"  # CRLF -> LF, one final newline
    assert text["intro.rst.txt"].startswith("Intro\n=====\n")


def test_html_is_stripped(tree):
    docs, _ = dd.extract_documents(tree, "pkg")
    page = next(d["text"] for d in docs if d["id"].endswith("standalone.html"))
    assert "Standalone & page" in page and "The quick brown fox" in page
    assert "  code line 1\n  code line 2" in page  # <pre> keeps its layout
    for hidden in ("<", "color: red", "var x", "menu"):
        assert hidden not in page


def test_pod_becomes_plain_text(tree):
    docs, _ = dd.extract_documents(tree, "pkg")
    pod = next(d["text"] for d in docs if d["id"].endswith(".pod"))
    assert pod.startswith("NAME\n\nperlfoo - bold and $a <=> $b in perlop\n\nfirst\n\nThe quick")
    assert "<tag>" in pod and "index term" not in pod and "not shown" not in pod
    assert "  verbatim C<kept>" in pod  # verbatim paragraphs are not interpreted
    assert "=" not in pod.replace("<=>", "")


@pytest.mark.parametrize("pod, text", [
    ("L<name/\"section\">", "name/section"),
    ("B<nested I<codes> here>", "nested codes here"),
    ("C<<< a >> b >>>", "a >> b"),
    ("E<gt>E<62>E<sol>", ">>/"),
    ("A<unclosed", "A<unclosed"),
    ("C<spans\nlines>", "spans\nlines"),
])
def test_pod_inline(pod, text):
    assert dd.pod_inline(pod) == text


def test_document_kind_rules():
    paths = {"h/_sources/a.rst.txt", "h/a.html", "h/b.html", "d/c.pod", "d/c.html", "d/README"}
    assert dd.document_kind("h/a.html", paths) is None  # built from _sources/a.rst.txt
    assert dd.document_kind("h/b.html", paths) == "html"
    assert dd.document_kind("d/c.html", paths) is None  # c.pod ships too
    assert dd.document_kind("d/c.pod", paths) == "pod"
    assert dd.document_kind("h/_sources/a.rst.txt", paths) == "text"
    assert dd.document_kind("d/README", paths) is None
    assert dd.document_kind("d/x.rst.gz", paths) is None


def test_split_order_is_fixed_and_independent_of_input_order():
    docs = [{"id": f"p:{i}", "text": str(i)} for i in range(50)]
    a = dd.split_order(docs)
    assert a == dd.split_order(list(reversed(docs))) and a != docs
    assert [d["id"] for d in a] == sorted((d["id"] for d in docs), key=lambda i: hashlib.sha256(i.encode()).hexdigest())


def test_download_error_says_what_to_do(tmp_path, monkeypatch):
    def no_apt(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory: 'apt-get'")

    monkeypatch.setattr(subprocess, "run", no_apt)
    with pytest.raises(DownloadError, match=r"apt-get download failed .*apt-get download perl-doc.* put the \.deb"):
        dd.download_debs(["perl-doc"], str(tmp_path / "debs"))


def test_existing_debs_are_used_and_duplicates_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("apt-get must not run"))
    write(str(tmp_path), "perl-doc_1.0_all.deb", b"x")
    assert dd.download_debs(["perl-doc"], str(tmp_path)) == {"perl-doc": str(tmp_path / "perl-doc_1.0_all.deb")}
    write(str(tmp_path), "perl-doc_2.0_all.deb", b"x")
    with pytest.raises(DataError, match="several .deb files for perl-doc"):
        dd.download_debs(["perl-doc"], str(tmp_path))


def test_prepare_from_cached_jsonl(tmp_path, monkeypatch):
    """With the JSONL files in place nothing is downloaded: tokenizer + .bin/.idx, then cached."""
    import random

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    rng = random.Random(0)
    words = PROSE.split() + ["def", "return", "struct", "sub", "my", "$x", "{", "}", "0x1f", "print"]
    docs = [{"id": f"pkg:doc{i}", "text": "\n".join(" ".join(rng.choice(words) for _ in range(12))
                                                  for _ in range(30))} for i in range(40)]
    data = str(tmp_path / "data")
    dd.corpus.write_jsonl(os.path.join(data, "raw", "debian_docs.jsonl"), dd.split_order(docs))
    dd.corpus.write_jsonl(os.path.join(data, "raw", "kjv.jsonl"), docs[:3])
    paths = dd.prepare_debian_docs(data, vocab_size=320)
    assert paths == dd.debian_docs_paths(data, 320)
    assert os.path.dirname(paths["tokenizer_model"]) == os.path.join(data, "debian-docs")
    with open(paths["train_prefix"] + ".json") as f:
        assert json.load(f)["documents"] == 40
    with open(paths["heldout_prefix"] + ".json") as f:
        assert json.load(f)["documents"] == 3
    stamp = os.path.getmtime(paths["train_prefix"] + ".bin")
    dd.prepare_debian_docs(data, vocab_size=320)
    assert os.path.getmtime(paths["train_prefix"] + ".bin") == stamp
