"""The pinned Debian packages of the second corpus and its table of domains.

None of these packages is used by the bundled corpus; each domain is a different genre
(editor help, English quips, German quips, C headers, Lisp code, a lexical database).  The
pins are the versions in Debian 12 "bookworm" (main suite, not the security suite, whose
versions are replaced as updates come).
"""

from __future__ import annotations

from bundled_corpus.domains import Domain

from . import cookies, source_code, vim_help, wordnet

PINNED_PACKAGES: dict[str, str] = {
    "vim-runtime": "2:9.0.1378-2+deb12u2",
    "fortunes": "1:1.99.1-7.3",
    "fortunes-de": "0.35-1",
    "linux-libc-dev": "6.1.176-1",
    "emacs-el": "1:28.2+1-15+deb12u4",
    "wordnet-base": "1:3.0-37",
}

DOMAINS: tuple[Domain, ...] = (
    Domain(
        name="vim_help",
        description="Vim 9.0's help files (reference manual and user manual), with their markup",
        packages=("vim-runtime",),
        licence_package="vim-runtime",
        licence="OPL-1.0-or-later (runtime/doc); Vim (the rest of the runtime)",
        homepage="https://www.vim.org/",
        unit=(
            "one section of a help file (between '=' rule lines); sections over 4,000 "
            "characters are split at blank lines"
        ),
        parser=vim_help.parse_vim_help,
    ),
    Domain(
        name="fortunes",
        description="fortune(6) cookies in English: quotations, jokes, anecdotes, poems",
        packages=("fortunes",),
        licence_package="fortunes",
        licence="BSD-3-Clause",
        homepage="https://github.com/shlomif/fortune-mod",
        unit="consecutive cookies of one file, separated by '%' lines, about 1,500 characters",
        parser=cookies.parse_fortunes,
    ),
    Domain(
        name="german",
        description="German fortune cookies: quotations, jokes, proverbs, recipes, anecdotes",
        packages=("fortunes-de",),
        licence_package="fortunes-de",
        licence="GPL-2.0-or-later",
        homepage="https://www.infodrom.org/projects/fortunes-de/",
        unit="consecutive cookies of one file, separated by '%' lines, about 1,500 characters",
        parser=cookies.parse_german_fortunes,
    ),
    Domain(
        name="c_headers",
        description="Linux 6.1 kernel headers for user space (usr/include), C source",
        packages=("linux-libc-dev",),
        licence_package="linux-libc-dev",
        licence="GPL-2.0-only WITH Linux-syscall-note (per file, see licence file)",
        homepage="https://www.kernel.org/",
        unit=(
            "part of a .h file (1-24 KB), verbatim, cut at blank lines into parts of about "
            "4,000 characters"
        ),
        parser=source_code.parse_c_headers,
    ),
    Domain(
        name="emacs_lisp",
        description="GNU Emacs 28.2 Emacs Lisp sources",
        packages=("emacs-el",),
        licence_package="emacs-el",
        licence="GPL-3.0-or-later",
        homepage="https://www.gnu.org/software/emacs/",
        unit=(
            "part of a .el file (1-24 KB, no leim/ tables), verbatim but for page breaks, "
            "cut at blank lines into parts of about 4,000 characters"
        ),
        parser=source_code.parse_emacs_lisp,
    ),
    Domain(
        name="wordnet",
        description="WordNet 3.0 synsets: lexicographer file, words, gloss and hypernyms",
        packages=("wordnet-base",),
        licence_package="wordnet-base",
        licence="WordNet-3.0",
        homepage="https://wordnet.princeton.edu/",
        unit="20 consecutive synsets in data-file order (nouns, verbs, adjectives, adverbs)",
        parser=wordnet.parse_wordnet,
    ),
)
