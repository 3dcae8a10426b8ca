"""fortunes, german: fortune(6) cookie files (strfile source: cookies separated by ``%`` lines).

Consecutive cookies of one file are grouped until a document reaches ``COOKIE_DOC_CHARS``
characters; the ``%`` separators stay, so a document looks like the file it comes from.
"""

from __future__ import annotations

import os
import re

from bundled_corpus.text import Doc, clean_prose, decode_mixed

COOKIE_DOC_CHARS = 1500

_OVERSTRIKE_RE = re.compile(r".\x08")  # "_\bX" underlines X on a printing terminal


def split_cookies(text: str) -> list[str]:
    """The cookies of one file, cleaned (overstrikes removed, tabs expanded), empty ones dropped."""
    text = _OVERSTRIKE_RE.sub("", text.replace("\r\n", "\n"))
    cookies = []
    for raw in re.split(r"^%%?[ \t]*\n", text + "\n", flags=re.M):
        cookie = clean_prose(raw.expandtabs(8))
        if cookie.strip():
            cookies.append(cookie)
    return cookies


def group_cookies(name: str, cookies: list[str], target: int) -> list[Doc]:
    """Consecutive cookies joined by ``%`` lines, each document closed once it reaches *target*
    characters (the file's last one joins the one before if under a third of *target*); ids are
    ``name/first-last`` (cookie numbers in the file)."""
    groups: list[tuple[int, int]] = []  # [start, end) cookie ranges
    start = 0
    while start < len(cookies):
        end, size = start, 0
        while end < len(cookies) and size < target:
            size += len(cookies[end]) + 2
            end += 1
        groups.append((start, end))
        start = end
    if len(groups) > 1 and sum(len(c) + 2 for c in cookies[groups[-1][0] :]) < target // 3:
        groups[-2:] = [(groups[-2][0], groups[-1][1])]
    return [
        Doc(f"{name}/{start:05d}-{end - 1:05d}", "%\n".join(cookies[start:end]))
        for start, end in groups
    ]


def parse_cookie_dir(directory: str) -> list[Doc]:
    """Every cookie file in *directory* (not the ``.dat`` indexes, not the ``.u8`` links)."""
    docs = []
    for fname in sorted(os.listdir(directory)):
        path = os.path.join(directory, fname)
        if fname.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as fh:
            cookies = split_cookies(decode_mixed(fh.read()))
        docs.extend(group_cookies(fname, cookies, COOKIE_DOC_CHARS))
    return docs


def parse_fortunes(root: str) -> list[Doc]:
    return parse_cookie_dir(os.path.join(root, "usr/share/games/fortunes"))


def parse_german_fortunes(root: str) -> list[Doc]:
    return parse_cookie_dir(os.path.join(root, "usr/share/games/fortunes/de"))
