"""vim_help: Vim's help files (``doc/*.txt``), one section per document.

A help file's sections are separated by lines of ``=`` signs; the section text keeps Vim's
help markup (``*tags*``, ``|links|``, ``{args}``), its tabs expanded to 8 columns as Vim shows
them.  The closing modeline is dropped; sections over ``VIM_PART_CHARS`` are split at blank
lines, sections under ``VIM_MIN_CHARS`` are left out.
"""

from __future__ import annotations

import glob
import os
import re

from bundled_corpus.text import Doc, clean_prose, decode_mixed, split_paragraphs

VIM_PART_CHARS = 4000
VIM_MIN_CHARS = 300

_RULE_RE = re.compile(r"^={20,}[ \t]*$", re.M)
_MODELINE_RE = re.compile(r"^[ \t]*vim:[^\n]*:[ \t]*$", re.M)


def split_help_file(text: str) -> list[str]:
    """The sections of one help file, cleaned, in file order (the part before the first rule
    included); long sections come back as several parts."""
    text = _MODELINE_RE.sub("", text.replace("\r\n", "\n")).expandtabs(8)
    parts = []
    for section in _RULE_RE.split(text):
        section = clean_prose(section)
        if len(section) < VIM_MIN_CHARS:
            continue
        parts.extend(clean_prose(p) for p in split_paragraphs(section.rstrip("\n"), VIM_PART_CHARS))
    return parts


def parse_vim_help(root: str) -> list[Doc]:
    (doc_dir,) = glob.glob(os.path.join(root, "usr/share/vim/vim*/doc"))
    docs = []
    for path in sorted(glob.glob(os.path.join(doc_dir, "*.txt"))):
        with open(path, "rb") as fh:
            sections = split_help_file(decode_mixed(fh.read()))
        name = os.path.basename(path)[: -len(".txt")]
        docs.extend(Doc(f"{name}/{k:03d}", s) for k, s in enumerate(sections))
    return docs
