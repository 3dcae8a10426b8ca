"""The pinned Debian packages and the table of domains: what each is made of and how it is parsed.

Each domain's ``parser`` takes the extracted package root (a list of roots when the domain
reads several packages) and returns its documents in their natural order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import bible, foldoc, gcide, gene_ontology, manpages, novels, python_stdlib

#: Every Debian binary package used, at the exact version (Debian 12 "bookworm").
PINNED_PACKAGES: dict[str, str] = {
    "bible-kjv-text": "4.38",
    "r-cran-janeaustenr": "1.0.0-1",
    "dict-gcide": "0.48.5+nmu2",
    "dict-foldoc": "20230119-1",
    "r-bioc-go.db": "3.16.0-1",
    "manpages": "6.03-2",
    "manpages-dev": "6.03-2",
    "libpython3.11-minimal": "3.11.2-6+deb12u9",
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
}


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    packages: tuple[str, ...]  # binary packages whose contents are parsed
    licence_package: str  # package whose usr/share/doc/<pkg>/copyright is shipped
    licence: str
    homepage: str
    unit: str
    parser: Callable  # the module function that turns the package root(s) into documents


DOMAINS: tuple[Domain, ...] = (
    Domain(
        name="bible",
        description=(
            "The King James Version of the Bible "
            "(Authorized Version, as in the bible-kjv data file)"
        ),
        packages=("bible-kjv-text",),
        licence_package="bible-kjv-text",
        licence="public domain",
        homepage="(none upstream; Debian package bible-kjv-text)",
        unit="one chapter (heading line, then one numbered verse per line)",
        parser=bible.parse_bible,
    ),
    Domain(
        name="novels",
        description=(
            "Jane Austen's six completed novels "
            "(Project Gutenberg texts as shipped by the janeaustenr R package)"
        ),
        packages=("r-cran-janeaustenr",),
        licence_package="r-cran-janeaustenr",
        licence="public domain (novels); MIT (janeaustenr package)",
        homepage="https://cran.r-project.org/package=janeaustenr",
        unit=(
            "one chapter; chapters over 6,000 characters are split at paragraph "
            "boundaries into near-equal parts"
        ),
        parser=novels.parse_novels,
    ),
    Domain(
        name="dictionary",
        description=(
            "Webster's Revised Unabridged Dictionary (1913) via GCIDE, "
            "the Collaborative International Dictionary of English"
        ),
        packages=("dict-gcide",),
        licence_package="dict-gcide",
        licence="GPL-2.0-or-later",
        homepage="https://www.gnu.org/software/gcide/",
        unit="20 consecutive dictionary entries",
        parser=gcide.parse_gcide,
    ),
    Domain(
        name="computing",
        description="FOLDOC, the Free On-line Dictionary of Computing",
        packages=("dict-foldoc",),
        licence_package="dict-foldoc",
        licence="GFDL-1.1-or-later",
        homepage="https://foldoc.org/",
        unit="15 consecutive dictionary entries",
        parser=foldoc.parse_foldoc,
    ),
    Domain(
        name="gene_ontology",
        description=(
            "Gene Ontology term names, definitions, synonyms and parents "
            "(GO release 2022-07-01, from Bioconductor GO.db)"
        ),
        packages=("r-bioc-go.db",),
        licence_package="r-bioc-go.db",
        licence="CC-BY-4.0 (Gene Ontology data); Artistic-2.0 (GO.db package)",
        homepage="https://bioconductor.org/packages/GO.db/",
        unit="20 consecutive GO terms in GO-id order",
        parser=gene_ontology.parse_gene_ontology,
    ),
    Domain(
        name="manpages",
        description="Linux man-pages, sections 2, 3, 5 and 7, rendered from roff to plain text",
        packages=("manpages", "manpages-dev"),
        licence_package="manpages",
        licence=(
            "GPL-2.0-or-later AND Linux-man-pages-copyleft AND others (per page, see licence file)"
        ),
        homepage="https://www.kernel.org/doc/man-pages/",
        unit="one man page",
        parser=manpages.parse_manpages,
    ),
    Domain(
        name="python",
        description="Python 3.11 standard library source code",
        packages=("libpython3.11-minimal", "libpython3.11-stdlib"),
        licence_package="libpython3.11-minimal",
        licence="PSF-2.0",
        homepage="https://www.python.org/",
        unit="one .py file, verbatim (1-24 KB, no tests, no encodings/ codec tables)",
        parser=python_stdlib.parse_python,
    ),
)
