"""The second corpus's parsers (scripts/second_corpus/), on small literal inputs: no network,
no Debian packages."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bundled_corpus.text import Doc  # noqa: E402
from second_corpus import cookies, source_code, vim_help, wordnet  # noqa: E402

# --- cookies: fortune files ---------------------------------------------------------------------


def test_split_cookies_separates_at_percent_lines_and_cleans_each_cookie():
    text = (
        "Hello\tworld.\n\t\t-- Anon\n%\n"
        "_\bu_\bn_\bd_\be_\br_\bl_\bi_\bn_\be_\bd  \n%\n"  # overstruck, trailing blanks
        "\n%\n"  # an empty cookie
        "Last one, 100% sure.\n%\n"
    )
    assert cookies.split_cookies(text) == [
        "Hello   world.\n                -- Anon\n",
        "underlined\n",
        "Last one, 100% sure.\n",
    ]


def test_group_cookies_closes_a_document_at_the_target_size():
    quips = ["a" * 9 + "\n", "b" * 9 + "\n", "c" * 9 + "\n", "d" * 9 + "\n", "e" * 9 + "\n"]
    # each cookie counts 12 (10 characters and its separator): 2 cookies reach 24 >= 20
    assert cookies.group_cookies("art", quips, 20) == [
        Doc("art/00000-00001", "aaaaaaaaa\n%\nbbbbbbbbb\n"),
        Doc("art/00002-00003", "ccccccccc\n%\nddddddddd\n"),
        Doc("art/00004-00004", "eeeeeeeee\n"),
    ]


def test_group_cookies_joins_a_short_last_group_to_the_one_before():
    quips = ["a" * 28 + "\n", "b" * 28 + "\n", "c\n"]  # the last group: 4 < 30 // 3
    assert cookies.group_cookies("law", quips, 30) == [
        Doc("law/00000-00000", "a" * 28 + "\n"),
        Doc("law/00001-00002", "b" * 28 + "\n%\nc\n"),
    ]


# --- vim_help: help files -----------------------------------------------------------------------

HELP_FILE = (
    "*demo.txt*\tFor Vim version 9.0.\n\nIntro text.\n\n"
    + "=" * 78
    + "\n1. Moving\t\t\t\t\t*demo-move*\n\n"
    + "Use |w| to move.\n\n"
    + "=" * 78
    + "\n2. Tiny\n"
    + "=" * 78
    + "\n3. Last\t*demo-last*\n\nThe end.\n\n vim:tw=78:ts=8:noet:ft=help:norl:\n"
)


def test_split_help_file_gives_one_section_per_rule_with_tabs_expanded(monkeypatch):
    monkeypatch.setattr(vim_help, "VIM_MIN_CHARS", 15)  # "2. Tiny" is left out
    assert vim_help.split_help_file(HELP_FILE) == [
        "*demo.txt*      For Vim version 9.0.\n\nIntro text.\n",
        "1. Moving                                       *demo-move*\n\nUse |w| to move.\n",
        "3. Last *demo-last*\n\nThe end.\n",  # the modeline is gone
    ]


def test_split_help_file_splits_a_long_section_at_blank_lines(monkeypatch):
    monkeypatch.setattr(vim_help, "VIM_MIN_CHARS", 0)
    paragraphs = [f"{k}: " + "word " * 399 + "end" for k in range(3)]  # 2,003 characters each
    parts = vim_help.split_help_file("\n\n".join(paragraphs) + "\n")  # one section: 6,013 > 4,000
    assert parts == [f"{paragraphs[0]}\n", f"{paragraphs[1]}\n\n{paragraphs[2]}\n"]


# --- source_code: C headers and Emacs Lisp ------------------------------------------------------


def test_source_text_removes_page_breaks_and_keeps_the_rest_verbatim():
    raw = b';;; a.el --- demo\n\x0c\n(defun f ()\n\t"Doc."\n  1)  \r\n'
    assert source_code.source_text(raw) == ';;; a.el --- demo\n\n(defun f ()\n\t"Doc."\n  1)  \n'


def test_source_text_refuses_what_cannot_be_a_document():
    assert source_code.source_text(b'char *s = "\xe9";\n') is None  # not UTF-8
    assert source_code.source_text(b"#define ESC \x1b\n") is None  # a control character
    assert source_code.source_text(b"\x0c\n\n") is None  # only a page break


def test_split_source_cuts_at_blank_lines_into_parts_ending_in_one_newline():
    forms = [f"(defvar v{k}\n  '(" + "x " * 495 + "))" for k in range(4)]  # 1,004 chars each
    text = "\n\n".join(forms[:2]) + "\n\n\n" + "\n\n".join(forms[2:]) + "\n"
    assert source_code.split_source(text, 2500) == [
        f"{forms[0]}\n\n{forms[1]}\n",
        f"{forms[2]}\n\n{forms[3]}\n",
    ]


def test_split_source_leaves_a_short_file_whole():
    text = "#ifndef A_H\n#define A_H\n\n#endif\n"
    assert source_code.split_source(text, 4000) == [text]


# --- wordnet: data files ------------------------------------------------------------------------

DOG = (
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 003 @ 02083346 n 0000 "
    "@ 01317541 n 0000 ~ 02084732 n 0000 | a member of the genus Canis;  "
    '"the dog barked all night"  '
)


def test_parse_synset_reads_words_pointers_and_gloss():
    synset = wordnet.parse_synset(DOG)
    assert synset == {
        "offset": "02084071",
        "pos": "n",
        "lexname": "noun.animal",
        "words": ["dog", "domestic dog", "Canis familiaris"],
        "pointers": [("@", "02083346", "n"), ("@", "01317541", "n"), ("~", "02084732", "n")],
        "gloss": 'a member of the genus Canis; "the dog barked all night"',
    }


def test_parse_synset_drops_the_adjective_position_marker():
    line = "00001740 00 s 02 able(p) 0 capable 0 000 | having the means"
    synset = wordnet.parse_synset(line)
    assert (synset["pos"], synset["lexname"], synset["words"]) == (
        "a",
        "adj.all",
        ["able", "capable"],
    )


def test_render_synset_names_the_hypernyms_it_knows():
    words_of = {("02083346", "n"): ["canine", "canid"], ("01317541", "n"): ["domestic animal"]}
    assert wordnet.render_synset(wordnet.parse_synset(DOG), words_of) == (
        "noun.animal: dog, domestic dog, Canis familiaris\n"
        '  a member of the genus Canis; "the dog barked all night"\n'
        "  is a: canine; domestic animal\n"
    )
