"""The builder of moelab's bundled corpus (``scripts/build_bundled_corpus.py`` is its command line).

One module per source format, each tested on a small fixture in ``tests/test_corpus_builder.py``
(the binary fixtures, and how they were made, are in ``tests/fixtures/corpus_builder/``):

==================  ================================================================
``bible``           BRS "EC02" data file: compress(1) LZW windows, decoded by gzip
``rdata``           R lazy-load database (XDR serialization), read by ``novels``
``novels``          Jane Austen's chapters from the janeaustenr R data
``dictd``           dictd ``.index`` + ``.dict.dz`` databases, read by ``gcide``, ``foldoc``
``gcide``           Webster's 1913 (GCIDE): source tags, letter codes
``foldoc``          FOLDOC, the Free On-line Dictionary of Computing
``gene_ontology``   GO.db's SQLite database
``roff``            roff man-macro and tbl renderer to plain text
``manpages``        which man pages are rendered and kept
``python_stdlib``   which standard-library ``.py`` files are kept
==================  ================================================================

Shared: ``text`` (the document record, errors, text cleaning), ``output`` (even selection
under the size cap, validation, the ``.jsonl.xz`` writer), ``debian`` (apt-get download,
dpkg-deb), ``domains`` (pins and the domain table) and ``build`` (build, check, main).
"""
