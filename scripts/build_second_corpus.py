#!/usr/bin/env python3
"""Build moelab's second multi-domain corpus from pinned Debian packages.

A corpus for measuring moelab beyond its bundled one: six more domains, each a different genre
(Vim help, English fortunes, German fortunes, Linux C headers, Emacs Lisp, WordNet), from
Debian packages the bundled corpus does not use.  Nothing of it is committed; build it when
needed:

    python3 scripts/build_second_corpus.py --out DIR [--cache DIR]

It writes DIR/<domain>/NNNN.txt (one document per file), DIR/MANIFEST.json and
DIR/.licences/.  Standard library only, plus Debian's apt-get and dpkg-deb; the same packages
give byte-identical output.  The code is the package ``scripts/second_corpus/``, which reuses
``scripts/bundled_corpus/``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from second_corpus.build import main

if __name__ == "__main__":
    sys.exit(main())
