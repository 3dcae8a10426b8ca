"""The builder of moelab's second multi-domain corpus (``scripts/build_second_corpus.py`` is
its command line), written as one folder per domain for ``moelab preprocess``.

It reuses the bundled corpus's builder (``scripts/bundled_corpus/``: fetching and extracting
the pinned Debian packages, the even selection under the size cap, validation, the manifest)
and adds one module per source format, each tested in ``tests/test_second_corpus.py``:

===============  =================================================================
``vim_help``     Vim's help files, one section per document
``cookies``      fortune(6) cookie files, English and German
``source_code``  C headers and Emacs Lisp sources, one file per document
``wordnet``      WordNet 3.0 data files, 20 synsets per document
===============  =================================================================

``domains`` holds the pins and the domain table, ``build`` the folder writer and ``main``.
"""
