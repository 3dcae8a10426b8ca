"""dictionary: Webster's 1913 via GCIDE (dict-gcide), 20 consecutive entries per document.

GCIDE's source tags (``[1913 Webster]``, ``[PJC]``, ...) and cross-reference braces are
removed, and its ASCII letter codes (``['e]``, ``[=a]``, ``[i^]``, ...) become Unicode.
"""

from __future__ import annotations

import os
import re
import unicodedata

from .dictd import group_entries, read_dictd
from .text import Doc, clean_prose


def _accent(letter: str, mark: str) -> str:
    return unicodedata.normalize("NFC", letter + mark)


# GCIDE's ASCII notation for letters and symbols (as written by dictd's
# conversion of the GCIDE XML entities).
# fmt: off
_GCIDE_SYMBOLS = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "=ae": "ǣ", "imac": "ī", "aum": "ä",
    "add": "a\u0324", "udd": "ṳ", "asl": "ā", "ng": "ŋ", "=oo": "o\u035eo", "oo^": "o\u035do",
    "eth": "ð", "th": "þ", "thorn": "þ", "yogh": "ȝ", "deg": "°", "sect": "§", "root": "√",
    "sec": "″", "min": "′", "bprime": "″", "flat": "♭", "sharp": "♯", "hand": "☞",
    "dagger": "†", "para": "¶", "pounds": "£", "times": "×", "div": "÷", "divby": "÷",
    "middot": "·", "rarr": "→", "ldqo": "“", "nbsp": " ", "zdot": "ż", "dsdot": "ḍ",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ",
    "eta": "η", "theta": "θ", "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ", "nu": "ν",
    "xi": "ξ", "omicron": "ο", "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ", "upsilon": "υ",
    "phi": "φ", "chi": "χ", "psi": "ψ", "omega": "ω",
}
# fmt: on
_GCIDE_MARKS = {
    "'": "\u0301",
    "`": "\u0300",
    "^": "\u0302",
    '"': "\u0308",
    "~": "\u0303",
    "=": "\u0304",
    "-": "\u0304",
    ",": "\u0327",
    "*": "\u030a",
}
_GCIDE_CODE_RE = re.compile(
    r"\[(?:([`'^\"~=\-,*])([A-Za-z])|([A-Za-z])\^|\.([A-Za-z])|("
    + "|".join(re.escape(k) for k in sorted(_GCIDE_SYMBOLS, key=len, reverse=True))
    + r"))\]"
)
_SOURCE_TAG_RE = re.compile(
    r"^\s*\[(?:[0-9]{4} Webster|Webster [0-9]{4}|WordNet|PJC|AS|RDH|MW10|RHUD|"
    r"[A-Z]{2,5}\.?\s*\]|\+)[^\]\n]*\]\s*$",
    re.M,
)


def _gcide_code(m: re.Match[str]) -> str:
    mark, letter, breve, dot, symbol = m.groups()
    if mark:
        return _accent(letter, _GCIDE_MARKS[mark])
    if breve:
        return _accent(breve, "\u0306")
    if dot:
        return _accent(dot, "\u0307" if dot in "aA" else "\u0323")
    return _GCIDE_SYMBOLS[symbol]


def clean_gcide(entry: str) -> str:
    entry = _SOURCE_TAG_RE.sub("", entry)
    entry = _GCIDE_CODE_RE.sub(_gcide_code, entry)
    entry = entry.replace("{", "").replace("}", "")
    return clean_prose(entry)


def parse_gcide(root: str) -> list[Doc]:
    d = os.path.join(root, "usr/share/dictd")
    entries = [clean_gcide(e) for e in read_dictd(f"{d}/gcide.index", f"{d}/gcide.dict.dz")]
    return group_entries(entries, 20, "entries-")
