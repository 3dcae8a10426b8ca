"""scripts/bundled_corpus, the builder of the bundled corpus: each parser on a small fixture.

The fixtures are in tests/fixtures/corpus_builder/ (made by the real tools that write those
formats: see make_fixtures.sh there) or made here in tmp_path.  Every expected output is
written out in full, so a parser that changes what it produces fails here.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "corpus_builder"
sys.path.insert(0, str(ROOT / "scripts"))

from bundled_corpus import (  # noqa: E402
    bible,
    build,
    debian,
    dictd,
    foldoc,
    gcide,
    gene_ontology,
    manpages,
    novels,
    output,
    python_stdlib,
    rdata,
    roff,
    text,
)
from bundled_corpus.domains import Domain  # noqa: E402
from bundled_corpus.text import BuildError, Doc  # noqa: E402


def place(root: Path, files: dict[str, str]) -> Path:
    """Copy fixture files (name -> path inside the package root) into *root*."""
    for name, rel in files.items():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(FIXTURES / name, dest)
    return root


def pairs(docs: list[Doc]) -> list[tuple[str, str]]:
    return [(d.id, d.text) for d in docs]


# --- text: shared helpers ---------------------------------------------------------------------


def test_decode_mixed_reads_stray_bytes_as_windows_1252():
    assert text.decode_mixed("café".encode()) == "café"
    assert text.decode_mixed(b"caf\xc3\xa9 \x93q\x94 \x80") == "café “q” €"


def test_clean_prose():
    raw = "\n\nline one  \r\nx\x07y\t\n\n\n\nlast\r\n\n\nend"
    assert text.clean_prose(raw) == "line one\nxy\n\nlast\n\nend\n"
    assert text.is_clean("a\tb\n")
    assert not text.is_clean("a\x0cb")
    assert not text.is_clean("a\rb")


# --- output: selection and writing -------------------------------------------------------------


def test_select_even_keeps_the_largest_evenly_spaced_subset_under_the_cap():
    docs = [Doc(str(i), "x" * size) for i, size in enumerate([10, 1, 10, 1, 10, 1, 10, 1])]
    assert output.select_even(docs, 1000) == docs
    # m = 5 takes indices 0, 1, 3, 4, 6 (32 bytes), m = 3 takes 0, 2, 5 (21 bytes)
    assert [d.id for d in output.select_even(docs, 39)] == ["0", "1", "3", "4", "6"]
    assert [d.id for d in output.select_even(docs, 31)] == ["0", "2", "5"]
    assert [d.id for d in output.select_even(docs, 5)] == ["0"]  # one document at least


def test_validate(monkeypatch):
    monkeypatch.setattr(output, "MIN_DOCUMENTS", 2)
    output.validate("d", [Doc("a", "x\n"), Doc("b", "y\n")])
    for docs, message in [
        ([Doc("a", "x\n"), Doc("a", "y\n")], "duplicate id 'a'"),
        ([Doc("a", "x\n"), Doc("b", " \n")], "empty document 'b'"),
        ([Doc("a", "x\n"), Doc("b", "y\x0c\n")], "control character in 'b'"),
        ([Doc("a", "x\n")], "only 1 documents (need 2)"),
    ]:
        with pytest.raises(BuildError, match=message.replace("(", r"\(").replace(")", r"\)")):
            output.validate("d", docs)


def test_write_jsonl_xz(tmp_path):
    docs = [Doc("b/1", "naïve “text”\n"), Doc("a/2", 'quote " and \\ \n')]
    path = tmp_path / "d.jsonl.xz"
    output.write_jsonl_xz(str(path), docs)
    data = path.read_bytes()
    assert data[:6] == b"\xfd7zXZ\x00" and data[7] == lzma.CHECK_CRC64
    assert lzma.decompress(data).decode("utf-8") == (
        '{"id": "b/1", "text": "naïve “text”\\n"}\n'
        '{"id": "a/2", "text": "quote \\" and \\\\ \\n"}\n'
    )
    output.write_jsonl_xz(str(tmp_path / "again.jsonl.xz"), docs)
    assert (tmp_path / "again.jsonl.xz").read_bytes() == data


# --- bible: BRS data file, compress(1) windows -------------------------------------------------

BIBLE_TEXT = (
    b"Holy Bible, test fixture.\n"
    b"Ge1:1 In the beginning God created the heaven and the earth.\n"
    b"Ge1:2 And the earth was without form, and void.\n"
    b"Ge2:1 Thus the heavens and the earth were finished.\n"
    b"Exo1:1 Now these are the names of the children of Israel.\n"
    b"1Jn1:1  That which was from the beginning,  \n"
    b"Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.\n"
    b"\n"
)


def test_read_brs_text_decodes_every_window():
    assert bible.read_brs_text(str(FIXTURES / "bible.data")) == BIBLE_TEXT


def test_parse_bible(tmp_path, monkeypatch):
    root = place(tmp_path, {"bible.data": "usr/lib/bible.data"})
    with pytest.raises(BuildError, match="expected 1189 chapters, found 5"):
        bible.parse_bible(str(root))
    monkeypatch.setattr(bible, "BIBLE_CHAPTERS", 5)
    assert pairs(bible.parse_bible(str(root))) == [
        (
            "01-genesis/001",
            "Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n"
            "2 And the earth was without form, and void.\n",
        ),
        ("01-genesis/002", "Genesis 2\n\n1 Thus the heavens and the earth were finished.\n"),
        ("02-exodus/001", "Exodus 1\n\n1 Now these are the names of the children of Israel.\n"),
        ("62-1-john/001", "1 John 1\n\n1 That which was from the beginning,\n"),
        (
            "66-revelation/022",
            "Revelation 22\n\n21 The grace of our Lord Jesus Christ be with you all. Amen.\n",
        ),
    ]


def test_read_brs_text_rejects_damaged_files(tmp_path):
    good = (FIXTURES / "bible.data").read_bytes()
    path = tmp_path / "bible.data"
    first = int.from_bytes(good[92:96], "big")
    for damaged, message in [
        (b"EC01" + good[4:], "not a BRS EC02 data file"),
        (good[: first - 3] + b"\x1f\x8b\x08" + good[first:], "no compress.1. header"),
        (good[:84] + (100).to_bytes(4, "big") + good[88:], "window 0 decompressed to 128"),
        (good[:first] + b"\xff" * 40 + good[first + 40 :], "gzip -dc"),
    ]:
        path.write_bytes(damaged)
        with pytest.raises(BuildError, match=message):
            bible.read_brs_text(str(path))


# --- rdata and novels: R lazy-load database ----------------------------------------------------

NOVEL_LINES = {
    "emma": [
        "EMMA", "", "VOLUME I", "", "CHAPTER I", "", "Emma Woodhouse, handsome.", "",
        "VOLUME II", "", "CHAPTER I", "", "Café and crème.", "naïve",
    ],
    "mansfieldpark": ["MANSFIELD PARK", "", "CHAPTER I", "", "About thirty years ago."],
    "northangerabbey": ["NORTHANGER ABBEY", "", "CHAPTER 1", "", "No one who had ever seen."],
    "persuasion": ["PERSUASION", "", "Chapter 1", "", "Sir Walter Elliot, of Kellynch Hall."],
    "prideprejudice": [
        "PRIDE AND PREJUDICE", "", "Chapter 1", "", "It is a truth universally acknowledged.",
        None, "However little known.",
    ],
    "sensesensibility": [
        "SENSE AND SENSIBILITY", "", "by Jane Austen", "", "CHAPTER 1", "",
        "The family of Dashwood had long been settled in Sussex.", "", "CHAPTER 2", "",
        "Mrs. John Dashwood now installed herself.",
    ],
}  # fmt: skip


def test_read_r_lazyload_reads_character_vectors():
    """NA is None, a latin1-marked string and a UTF-8 one both come out as text."""
    objects = rdata.read_r_lazyload(str(FIXTURES / "Rdata"))
    assert objects == {name: ("vec", 16, lines, None) for name, lines in NOVEL_LINES.items()}


def test_r_blob_compressions():
    payload = b"X\n serialized"
    head = len(payload).to_bytes(4, "big")
    assert rdata._r_blob(head + zlib.compress(payload)) == payload
    assert rdata._r_blob(head + b"Z" + lzma.compress(payload)) == payload
    import bz2

    assert rdata._r_blob(head + b"2" + bz2.compress(payload)) == payload
    assert rdata._r_blob(head + b"0" + payload) == payload
    with pytest.raises(BuildError, match="only XDR"):
        rdata._RUnserializer(b"A\n")


def test_parse_novels(tmp_path):
    data = "usr/lib/R/site-library/janeaustenr/data/"
    root = place(tmp_path, {"Rdata.rdx": data + "Rdata.rdx", "Rdata.rdb": data + "Rdata.rdb"})
    assert pairs(novels.parse_novels(str(root))) == [
        (
            "sensesensibility/ch01.1",
            "Sense and Sensibility\nCHAPTER 1\n\n"
            "The family of Dashwood had long been settled in Sussex.\n",
        ),
        (
            "sensesensibility/ch02.1",
            "Sense and Sensibility\nCHAPTER 2\n\nMrs. John Dashwood now installed herself.\n",
        ),
        (
            "prideprejudice/ch01.1",
            "Pride and Prejudice\nChapter 1\n\n"
            "It is a truth universally acknowledged.\n\nHowever little known.\n",
        ),
        ("mansfieldpark/ch01.1", "Mansfield Park\nCHAPTER I\n\nAbout thirty years ago.\n"),
        ("emma/ch01.1", "Emma\nVOLUME I, CHAPTER I\n\nEmma Woodhouse, handsome.\n"),
        ("emma/ch02.1", "Emma\nVOLUME II, CHAPTER I\n\nCafé and crème.\nnaïve\n"),
        ("northangerabbey/ch01.1", "Northanger Abbey\nCHAPTER 1\n\nNo one who had ever seen.\n"),
        ("persuasion/ch01.1", "Persuasion\nChapter 1\n\nSir Walter Elliot, of Kellynch Hall.\n"),
    ]


def test_parse_novels_needs_chapters(monkeypatch):
    empty = {key: ("vec", 16, ["TITLE", "", "no chapters"], None) for key, _ in novels.NOVELS}
    monkeypatch.setattr(novels, "read_r_lazyload", lambda prefix: empty)
    with pytest.raises(BuildError, match="no chapters found in sensesensibility"):
        novels.parse_novels("/nonexistent")


def test_split_paragraphs():
    a, b, c, d, e = "a" * 10, "b" * 20, "c" * 5, "d" * 30, "e" * 8
    body = "\n\n".join([a, b, c, d, e])  # 81 characters: 3 parts of at most 30
    assert text.split_paragraphs(body, 100) == [body]
    assert text.split_paragraphs(body, 30, min_part=0) == [
        f"{a}\n\n{b}",
        c,
        f"{d}\n\n{e}",
    ]
    # a part under min_part is merged into the one before it
    assert text.split_paragraphs(body, 30, min_part=12) == [f"{a}\n\n{b}\n\n{c}", f"{d}\n\n{e}"]


# --- dictd, gcide, foldoc: dictd databases -----------------------------------------------------


def test_dictd_number():
    assert [dictd._dictd_number(s) for s in ("A", "Hg", "+/", "BAA")] == [0, 480, 4031, 4096]


def test_read_dictd():
    """00-database entries and entries under 20 characters are left out; the preface in front
    of the first entry is dropped; two headwords of one entry give it once; a stray byte is
    read as Windows-1252."""
    entries = dictd.read_dictd(str(FIXTURES / "gcide.index"), str(FIXTURES / "gcide.dict.dz"))
    assert entries == [
        'Abdicator \\Ab"di*ca`tor\\, n.\n'
        "   One who abdicates. See {Abdication}. [R.]\n"
        "   [1913 Webster]\n",
        "Caf['e] \\Caf`['e]\\, n. [F.]\n"
        "   A coffee house; na[i^]ve [ae]ther, the [=a]ge, [.a] [.d] [=oo].\n"
        "   [PJC]\n",
        'Degree \\De*gree"\\, n. 90[deg] of “arc”; [alpha] and [oe].\n   [WordNet 1.5]\n',
    ]


def test_group_entries():
    entries = ["one\n", "two\n\n", "three\n", "  \n", "five\n"]
    assert pairs(dictd.group_entries(entries, 2, "e-")) == [
        ("e-000000-000001", "one\n\ntwo\n"),
        ("e-000002-000003", "three\n"),
        ("e-000004-000004", "five\n"),
    ]


def test_parse_gcide(tmp_path):
    d = "usr/share/dictd/"
    root = place(tmp_path, {"gcide.index": d + "gcide.index", "gcide.dict.dz": d + "gcide.dict.dz"})
    assert pairs(gcide.parse_gcide(str(root))) == [
        (
            "entries-000000-000002",
            'Abdicator \\Ab"di*ca`tor\\, n.\n'
            "   One who abdicates. See Abdication. [R.]\n"
            "\n"
            "Café \\Caf`é\\, n. [F.]\n"
            "   A coffee house; naĭve æther, the āge, ȧ ḍ o\u035eo.\n"
            "\n"
            'Degree \\De*gree"\\, n. 90° of “arc”; α and œ.\n',
        )
    ]


def test_clean_gcide_codes():
    assert gcide.clean_gcide('[`a] [^o] ["u] [~n] [-e] [,c] [*a] [A^] [.A] [sect][root]\n') == (
        "à ô ü ñ ē ç å Ă Ȧ §√\n"
    )


def test_parse_foldoc(tmp_path):
    d = "usr/share/dictd/"
    root = place(tmp_path, {n: d + n for n in ("foldoc.index", "foldoc.dict.dz")})
    assert pairs(foldoc.parse_foldoc(str(root))) == [
        (
            "entries-000000-000001",
            "-oid\n\n   <jargon> A suffix, as in nerdoid.\n\n   (1999-07-10)\n\n"
            "ABEL\n\n   <language> Advanced Boolean Expression Language.\n\n   (1995-01-24)\n",
        )
    ]


# --- gene_ontology: GO.db's SQLite database ----------------------------------------------------


def make_go_sqlite(path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE go_term (_id INTEGER, go_id TEXT, term TEXT, ontology TEXT,
                              definition TEXT);
        CREATE TABLE go_synonym (_id INTEGER, synonym TEXT, like_go_id INTEGER);
        CREATE TABLE go_bp_parents (_id INTEGER, _parent_id INTEGER, relationship_type TEXT);
        CREATE TABLE go_cc_parents (_id INTEGER, _parent_id INTEGER, relationship_type TEXT);
        CREATE TABLE go_mf_parents (_id INTEGER, _parent_id INTEGER, relationship_type TEXT);
        INSERT INTO go_term VALUES
            (1, 'all', 'all', 'universal', 'not a GO term'),
            (2, 'GO:0008150', 'biological_process', 'BP', 'A biological  process.'),
            (3, 'GO:0009987', 'cellular process', 'BP', 'Any process
                carried out at the cellular level.'),
            (4, 'GO:0005575', 'cellular_component', 'CC', NULL),
            (5, 'GO:0005623', 'cell', 'CC', 'The basic unit.');
        INSERT INTO go_synonym VALUES
            (3, 'cell physiology', 0), (3, 'cell growth', 0), (3, 'cell growth', 0),
            (3, 'GO:0008151', 1);
        INSERT INTO go_bp_parents VALUES (3, 2, 'isa'), (3, 2, 'isa'), (2, 1, 'isa');
        INSERT INTO go_cc_parents VALUES (5, 4, 'part of'), (5, 3, 'isa');
        """
    )
    con.commit()
    con.close()


def test_parse_gene_ontology(tmp_path, monkeypatch):
    db = tmp_path / "usr/lib/R/site-library/GO.db/extdata/GO.sqlite"
    db.parent.mkdir(parents=True)
    make_go_sqlite(db)
    monkeypatch.setattr(gene_ontology, "GO_GROUP", 3)
    assert pairs(gene_ontology.parse_gene_ontology(str(tmp_path))) == [
        (
            "GO:0005575..GO:0008150",
            "GO:0005575 cellular_component\nNamespace: cellular_component\n\n"
            "GO:0005623 cell\nNamespace: cellular_component\nDefinition: The basic unit.\n"
            "is_a: GO:0009987 cellular process\npart_of: GO:0005575 cellular_component\n\n"
            "GO:0008150 biological_process\nNamespace: biological_process\n"
            "Definition: A biological process.\n",
        ),
        (
            "GO:0009987..GO:0009987",
            "GO:0009987 cellular process\nNamespace: biological_process\n"
            "Definition: Any process carried out at the cellular level.\n"
            "Synonyms: cell growth; cell physiology\n"
            "is_a: GO:0008150 biological_process\n",
        ),
    ]


# --- roff and manpages ---------------------------------------------------------------------------


def test_render_man_sample_page():
    src = (FIXTURES / "sample.7").read_text(encoding="utf-8")
    expected = (FIXTURES / "sample.7.txt").read_text(encoding="utf-8")
    assert roff.render_man(src) == ("SAMPLE(7)", expected)


def test_roff_escapes():
    src = r"\fBbold\fR \(em \[u2014] \*(lq\e\- x\~y \s-1small\s0 \h'1m'z \" comment"
    assert roff.roff_escapes(src) == "bold — — “\\- x\u00a0y small z "
    assert roff._roff_args(r'one "two words" "say ""hi""" \fBx\ y\fP') == [
        "one",
        "two words",
        'say "hi"',
        r"\fBx\ y\fP",
    ]


def test_parse_manpages(tmp_path, monkeypatch):
    sample = (FIXTURES / "sample.7").read_bytes()
    man = tmp_path / "manpages/usr/share/man"
    for section in ("man1", "man3", "man5", "man7"):
        (man / section).mkdir(parents=True)
    (man / "man7/sample.7.gz").write_bytes(gzip.compress(sample, mtime=0))
    (man / "man7/alias.7.gz").symlink_to("sample.7.gz")  # an alias: skipped
    (man / "man3/redirect.3.gz").write_bytes(gzip.compress(b".so man7/sample.7\n"))  # skipped
    (man / "man1/sample.1").write_bytes(sample)  # section 1 is not read
    (man / "man5/short.5").write_bytes(b".TH SHORT 5\n.SH NAME\nshort \\- too short\n")
    dev = tmp_path / "manpages-dev/usr/share/man/man2"
    dev.mkdir(parents=True)
    (dev / "sample.2").write_bytes(sample)
    expected = (FIXTURES / "sample.7.txt").read_text(encoding="utf-8")
    roots = [str(tmp_path / "manpages"), str(tmp_path / "manpages-dev")]
    assert pairs(manpages.parse_manpages(roots)) == [
        ("man2/sample.2", expected),
        ("man7/sample.7", expected),
    ]
    # with no lower limit the short page is kept, and the .so redirect still is not
    monkeypatch.setattr(manpages, "MAN_MIN_CHARS", 0)
    ids = [d.id for d in manpages.parse_manpages(roots)]
    assert ids == ["man2/sample.2", "man5/short.5", "man7/sample.7"]


def test_parse_manpages_size_limits(tmp_path, monkeypatch):
    """Pages rendered to under 500 or over 48,000 characters are left out, as documented."""
    assert (manpages.MAN_MIN_CHARS, manpages.MAN_MAX_CHARS) == (500, 48_000)
    (tmp_path / "usr/share/man/man7").mkdir(parents=True)
    shutil.copyfile(FIXTURES / "sample.7", tmp_path / "usr/share/man/man7/sample.7")
    size = len((FIXTURES / "sample.7.txt").read_text(encoding="utf-8"))
    for low, high, kept in [
        (size, size, ["man7/sample.7"]),
        (size + 1, 48_000, []),
        (500, size - 1, []),
    ]:
        monkeypatch.setattr(manpages, "MAN_MIN_CHARS", low)
        monkeypatch.setattr(manpages, "MAN_MAX_CHARS", high)
        assert [d.id for d in manpages.parse_manpages([str(tmp_path)])] == kept


# --- python_stdlib -------------------------------------------------------------------------------


def test_parse_python(tmp_path):
    body = "x = 1\n" * 200  # 1,200 bytes
    minimal = tmp_path / "minimal/usr/lib/python3.11"
    stdlib = tmp_path / "stdlib/usr/lib/python3.11"
    files = {
        minimal / "os.py": body,
        stdlib / "json/decoder.py": "# é\n" + body,
        stdlib / "json/__init__.py": body,
        stdlib / "tiny.py": "x = 1\n",  # under 1 KB
        stdlib / "huge.py": "x = 1\n" * 5000,  # over 24 KB
        stdlib / "test/support.py": body,
        stdlib / "unittest/tests/case.py": body,
        stdlib / "encodings/cp1252.py": body,
        stdlib / "test_thing.py": body,
        stdlib / "_sysconfigdata__linux.py": body,
        stdlib / "formfeed.py": body + "\x0c\n",
        stdlib / "notes.txt": body,
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    (stdlib / "latin.py").write_bytes(b"# \xe9\n" + body.encode())
    (stdlib / "link.py").symlink_to("tiny.py")
    roots = [str(tmp_path / "minimal"), str(tmp_path / "stdlib")]
    assert pairs(python_stdlib.parse_python(roots)) == [
        ("json/__init__.py", body),
        ("json/decoder.py", "# é\n" + body),
        ("os.py", body),
    ]


# --- debian and build: a whole build from a .deb made here ---------------------------------------

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


def make_deb(tmp_path: Path, cache: Path, version: str, file_version: str | None = None) -> Path:
    tree = tmp_path / f"tree-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        f"Package: fake-text\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Nobody <nobody@example.org>\nDescription: test package\n"
    )
    (tree / "usr/share/doc/fake-text").mkdir(parents=True)
    (tree / "usr/share/doc/fake-text/copyright").write_bytes(b"Public domain.\n")
    (tree / "usr/share/fake").mkdir(parents=True)
    (tree / "usr/share/fake/lines.txt").write_text("alpha\nbêta\ngamma\n", encoding="utf-8")
    deb = cache / f"fake-text_{file_version or version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True,
                   capture_output=True)  # fmt: skip
    return deb


def parse_fake(root: str) -> list[Doc]:
    with open(os.path.join(root, "usr/share/fake/lines.txt"), encoding="utf-8") as fh:
        return [Doc(f"line-{i}", line) for i, line in enumerate(fh)]


FAKE = Domain(
    name="fake",
    description="a test domain",
    packages=("fake-text",),
    licence_package="fake-text",
    licence="public domain",
    homepage="https://example.org/",
    unit="one line",
    parser=parse_fake,
)


@needs_dpkg
def test_fetch_deb_checks_the_cached_package(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    deb = make_deb(tmp_path, cache, "1.0-1")
    assert debian.fetch_deb("fake-text", "1.0-1", str(cache)) == str(deb)
    make_deb(tmp_path, cache, "2.0-1", file_version="1.5-1")
    with pytest.raises(BuildError, match=r"is fake-text 2.0-1, expected fake-text 1.5-1"):
        debian.fetch_deb("fake-text", "1.5-1", str(cache))


@needs_dpkg
def test_build_check_and_main(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_deb(tmp_path, cache, "1.0-1")
    monkeypatch.setattr(build, "DOMAINS", (FAKE,))
    monkeypatch.setattr(build, "PINNED_PACKAGES", {"fake-text": "1.0-1"})
    monkeypatch.setattr(output, "MIN_DOCUMENTS", 3)
    monkeypatch.setattr(build, "CAP_BYTES", 12)  # keeps lines 0 and 1: 12 bytes, 11 characters

    out = tmp_path / "out"
    assert build.main(["--out", str(out), "--cache", str(cache)]) == 2  # 2 documents < 3
    assert "error: fake: only 2 documents (need 3)" in capsys.readouterr().err

    monkeypatch.setattr(output, "MIN_DOCUMENTS", 2)
    assert build.main(["--out", str(out), "--cache", str(cache)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "MANIFEST.json",
        "fake.jsonl.xz",
        "licences/fake.copyright",
    ]
    assert (out / "MANIFEST.json").read_text(encoding="utf-8") == json.dumps(
        {
            "domains": [
                {
                    "bytes_utf8": 12,
                    "characters": 11,
                    "description": "a test domain",
                    "documents": 2,
                    "homepage": "https://example.org/",
                    "licence": "public domain",
                    "licence_file": "licences/fake.copyright",
                    "name": "fake",
                    "package": "fake-text",
                    "unit": "one line",
                    "version": "1.0-1",
                }
            ]
        },
        indent=2,
    ) + "\n"
    assert lzma.decompress((out / "fake.jsonl.xz").read_bytes()) == (
        '{"id": "line-0", "text": "alpha\\n"}\n{"id": "line-1", "text": "bêta\\n"}\n'.encode()
    )
    assert (out / "licences/fake.copyright").read_bytes() == b"Public domain.\n"

    assert build.main(["--out", str(out), "--cache", str(cache), "--check"]) == 0
    (out / "licences/fake.copyright").write_bytes(b"changed\n")
    assert build.main(["--out", str(out), "--cache", str(cache), "--check"]) == 1
    assert "differs: licences/fake.copyright" in capsys.readouterr().err


def test_command_line_entry_point():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/build_bundled_corpus.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Rebuild moelab's bundled multi-domain corpus from pinned Debian packages." in (
        proc.stdout
    )
    assert str(ROOT / "moelab/data/bundled") == build.DEFAULT_OUT
