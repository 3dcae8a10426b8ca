"""`moelab preprocess`: binarize a corpus, as `fairseq-preprocess` does."""

from __future__ import annotations

import argparse

from moelab.cli.flags import add_config_arguments, config_kwargs
from moelab.data.preprocess import PreprocessConfig, preprocess

_INPUT = "input (exactly one of --bundled, --data, --trainpref)"
FLAGS = {
    "destdir": dict(help="output folder (the data-bin)", metavar="DIR"),
    "bundled": dict(help="the corpus that ships with moelab", group=_INPUT),
    "data": dict(help="a folder with one sub-folder of text files per domain, a .jsonl file "
                      "with 'text' and optional 'domain', or shards: paths and quoted globs of "
                      ".jsonl, .jsonl.gz, .jsonl.xz, .jsonl.zst and .parquet files (zstd and "
                      "Parquet need pip install 'moelab[corpora]'); split by the fractions below",
                 metavar="PATH", nargs="+", group=_INPUT),
    "trainpref": dict(help="train split: a fairseq-style .txt (documents separated by blank "
                           "lines), a .jsonl, a domain folder, or a quoted glob of shards",
                      metavar="PATH", group=_INPUT),
    "validpref": dict(help="valid split (same forms as --trainpref)", metavar="PATH",
                      group=_INPUT),
    "testpref": dict(help="test split (same forms as --trainpref)", metavar="PATH", group=_INPUT),
    "vocab_size": dict(help="SentencePiece vocabulary size (unused with --tokenizer)",
                       flag="--nwordssrc"),
    "tokenizer": dict(help="encode with this existing tokenizer (a data-bin's spm.model, or the "
                           "data-bin folder) and train none: a new corpus a trained model can "
                           "score; then --validpref/--testpref need no --trainpref",
                      metavar="SPM_MODEL"),
    "valid_fraction": dict(help="share of each domain held out for valid with --data/--bundled"),
    "test_fraction": dict(help="share of each domain held out for test with --data/--bundled"),
    "text_field": dict(help="the record field holding the text; dotted paths reach nested "
                            "fields (JSON lines and Parquet)", metavar="FIELD"),
    "domain_field": dict(help="the record field holding the domain, e.g. meta.pile_set_name "
                              "(default: 'domain' where a record has one, else 'unknown')",
                         metavar="FIELD"),
    "id_field": dict(help="the record field that keys a shard's documents (default: the shard's "
                          "path and line or row number)", metavar="FIELD"),
    "domains": dict(help="keep only these domains, comma-separated", metavar="A,B,C",
                    parse=lambda text: [d.strip() for d in text.split(",") if d.strip()]),
    "max_docs_per_domain": dict(help="keep at most the first N documents of each domain"),
    "skip_bad_lines": dict(help="skip records that are not JSON, lack a field or lie in a "
                                "damaged shard, counting and listing them in meta.json, instead "
                                "of stopping"),
    "spm_sample_bytes": dict(help="SentencePiece learns from at most this many bytes of train "
                                  "text: a seeded sample by document key hash"),
    "seed": dict(help="seeds the tokenizer's sample of the train split"),
    "workers": dict(help="processes that encode the splits"),
    "force": dict(help="write into an existing non-empty --destdir (other files are kept)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PreprocessConfig, specs=FLAGS)
    parser.add_argument("--bpe", default="sentencepiece", choices=["sentencepiece"],
                        help="tokenizer: SentencePiece BPE, trained on the train split unless "
                             "--tokenizer gives one")
    parser.add_argument("--only-source", action="store_true",
                        help="accepted for fairseq compatibility: language-model data is always "
                             "source-only")


def run(args: argparse.Namespace) -> int:
    config = PreprocessConfig(**config_kwargs(args, PreprocessConfig))
    meta = preprocess(config)
    origin = f" (the tokenizer of {config.tokenizer})" if config.tokenizer else ""
    print(f"wrote {config.destdir}: vocabulary {meta['vocab_size']}{origin}, "
          f"{len(meta['domains'])} domain(s) {meta['domains']}")
    for split, stats in meta["splits"].items():
        print(f"  {split:5s} {stats['documents']:7d} documents {stats['tokens']:10d} tokens")
    return 0
