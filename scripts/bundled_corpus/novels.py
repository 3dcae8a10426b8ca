"""novels: Jane Austen's six novels from the janeaustenr R package, one document per chapter.

The novels are character vectors (one element per line) in the package's R lazy-load database,
read by ``rdata``; chapters over ``NOVEL_PART_CHARS`` are split at paragraph boundaries.
"""

from __future__ import annotations

import os
import re

from .rdata import read_r_lazyload
from .text import BuildError, Doc, clean_prose, split_paragraphs

NOVELS: tuple[tuple[str, str], ...] = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
NOVEL_PART_CHARS = 6000


def parse_novels(root: str) -> list[Doc]:
    objects = read_r_lazyload(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    heading_re = re.compile(r"^(CHAPTER|Chapter) ([0-9]+|[IVXLC]+)\.?$")
    volume_re = re.compile(r"^(VOLUME|Volume) ([IVX]+)\.?$")
    docs = []
    for key, title in NOVELS:
        lines = [ln if ln is not None else "" for ln in objects[key][2]]
        chapters: list[tuple[str, list[str]]] = []  # (heading, body lines)
        volume = ""
        for line in lines:
            s = line.strip()
            if volume_re.match(s):
                volume = s
                continue
            if heading_re.match(s):
                chapters.append((f"{volume}, {s}" if volume else s, []))
            elif chapters:
                chapters[-1][1].append(line)
        if not chapters:
            raise BuildError(f"novels: no chapters found in {key}")
        for index, (heading, body_lines) in enumerate(chapters, start=1):
            body = clean_prose("\n".join(body_lines)).strip("\n")
            parts = split_paragraphs(body, NOVEL_PART_CHARS)
            for k, part in enumerate(parts, start=1):
                label = heading if len(parts) == 1 else f"{heading} (part {k} of {len(parts)})"
                docs.append(
                    Doc(f"{key}/ch{index:02d}.{k}", clean_prose(f"{title}\n{label}\n\n{part}"))
                )
    return docs
