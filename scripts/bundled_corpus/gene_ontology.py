"""gene_ontology: GO terms from GO.db's SQLite database, 20 consecutive terms per document.

Each term is its id and name, namespace, definition, synonyms and parents (``is_a``,
``part_of``, ...), in GO-id order.
"""

from __future__ import annotations

import os
import sqlite3

from .text import Doc, clean_prose

GO_NAMESPACES = {"BP": "biological_process", "MF": "molecular_function", "CC": "cellular_component"}
GO_RELATIONS = {"isa": "is_a"}
GO_GROUP = 20


def parse_gene_ontology(root: str) -> list[Doc]:
    path = os.path.join(root, "usr/lib/R/site-library/GO.db/extdata/GO.sqlite")
    con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        terms = con.execute(
            "SELECT _id, go_id, term, ontology, definition FROM go_term "
            "WHERE go_id LIKE 'GO:%' ORDER BY go_id"
        ).fetchall()
        names = {row[0]: (row[1], row[2]) for row in terms}
        term_of = {go_id: term for go_id, term in names.values()}
        synonyms: dict[int, list[str]] = {}
        for _id, syn in con.execute(
            "SELECT _id, synonym FROM go_synonym WHERE like_go_id = 0 ORDER BY _id, synonym"
        ):
            synonyms.setdefault(_id, []).append(syn)
        parents: dict[int, list[tuple[str, str]]] = {}
        for table in ("go_bp_parents", "go_cc_parents", "go_mf_parents"):
            for _id, parent, rel in con.execute(
                f"SELECT _id, _parent_id, relationship_type FROM {table}"
            ):
                if parent in names:
                    parents.setdefault(_id, []).append((rel, names[parent][0]))
    finally:
        con.close()
    blocks = []
    for _id, go_id, term, ontology, definition in terms:
        lines = [f"{go_id} {term}", f"Namespace: {GO_NAMESPACES.get(ontology, ontology)}"]
        if definition:
            lines.append(f"Definition: {' '.join(definition.split())}")
        syns = sorted(set(synonyms.get(_id, [])))
        if syns:
            lines.append("Synonyms: " + "; ".join(syns))
        for rel, pid in sorted(set(parents.get(_id, []))):
            lines.append(f"{GO_RELATIONS.get(rel, rel.replace(' ', '_'))}: {pid} {term_of[pid]}")
        blocks.append((go_id, "\n".join(lines) + "\n"))
    docs = []
    for start in range(0, len(blocks), GO_GROUP):
        chunk = blocks[start : start + GO_GROUP]
        text = "\n".join(b for _, b in chunk)
        docs.append(Doc(f"{chunk[0][0]}..{chunk[-1][0]}", clean_prose(text)))
    return docs
