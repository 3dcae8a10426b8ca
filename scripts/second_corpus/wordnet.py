"""wordnet: WordNet 3.0 synsets (``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``),
``WORDNET_GROUP`` consecutive synsets per document.

Each synset is rendered as its lexicographer file and words, its gloss (definition and quoted
examples) and its hypernyms (``is a``), in the data files' order, which keeps a lexicographer
file's synsets together.
"""

from __future__ import annotations

import os

from bundled_corpus.text import Doc, clean_prose

WORDNET_GROUP = 20
WORDNET_FILES = ("noun", "verb", "adj", "adv")

#: lexnames(5WN): the lexicographer file of each lex_filenum.
LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)


def parse_synset(line: str) -> dict:
    """One ``data.*`` line: offset, pos, lexicographer file, words, pointers and gloss."""
    head, _, gloss = line.partition(" | ")
    f = head.split()
    offset, lex_filenum, pos = f[0], int(f[1]), f[2]
    w_cnt = int(f[3], 16)
    words = []
    for k in range(w_cnt):
        word = f[4 + 2 * k]
        if pos in ("a", "s") and word.endswith(")") and "(" in word:
            word = word[: word.rindex("(")]  # adjective position marker: (a), (p), (ip)
        words.append(word.replace("_", " "))
    i = 4 + 2 * w_cnt
    pointers = []
    for _ in range(int(f[i])):
        pointers.append((f[i + 1], f[i + 2], f[i + 3]))  # symbol, target offset, target pos
        i += 4
    return {
        "offset": offset,
        "pos": "a" if pos == "s" else pos,
        "lexname": LEXNAMES[lex_filenum],
        "words": words,
        "pointers": pointers,
        "gloss": " ".join(gloss.split()),
    }


def render_synset(synset: dict, words_of: dict[tuple[str, str], list[str]]) -> str:
    lines = [f"{synset['lexname']}: {', '.join(synset['words'])}"]
    if synset["gloss"]:
        lines.append(f"  {synset['gloss']}")
    hypernyms = [
        words_of[(target, "a" if tpos == "s" else tpos)][0]
        for symbol, target, tpos in synset["pointers"]
        if symbol in ("@", "@i") and (target, "a" if tpos == "s" else tpos) in words_of
    ]
    if hypernyms:
        lines.append(f"  is a: {'; '.join(hypernyms)}")
    return "\n".join(lines) + "\n"


def read_data_file(path: str) -> list[dict]:
    synsets = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("  "):  # the licence header
                continue
            synsets.append(parse_synset(line.rstrip("\n")))
    return synsets


def parse_wordnet(root: str) -> list[Doc]:
    base = os.path.join(root, "usr/share/wordnet")
    synsets = []
    for name in WORDNET_FILES:
        synsets.extend(read_data_file(os.path.join(base, f"data.{name}")))
    words_of = {(s["offset"], s["pos"]): s["words"] for s in synsets}
    docs = []
    for start in range(0, len(synsets), WORDNET_GROUP):
        chunk = synsets[start : start + WORDNET_GROUP]
        text = "\n".join(render_synset(s, words_of) for s in chunk)
        first, last = chunk[0], chunk[-1]
        doc_id = f"{first['pos']}{first['offset']}..{last['pos']}{last['offset']}"
        docs.append(Doc(doc_id, clean_prose(text)))
    return docs
