"""Every preset moelab has, and the one table from fairseq's flag names to the model's own.

The model's shape has one vocabulary: ModelConfig's fields (`n_layer`, `n_embd`, ...). The
command line keeps fairseq's flag names (`--decoder-layers`, ...), because the commands of the
original fairseq workflow must run unchanged; `FAIRSEQ_MODEL_FLAGS` maps one to the other, and
nothing else spells the mapping out.

- `ARCHITECTURES`: what `--arch` names (ModelConfig fields).
- `STUDIES`: the sizes of the notebooks and the demo (`gpu`, `cpu`, `smoke`): `moelab train`
  options, how the bundled corpus is preprocessed, and K.
- `BENCHMARKS`: what `moelab bench --preset` times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# --arch: ModelConfig fields. fairseq's transformer_lm and transformer_lm_gpt sizes.
ARCHITECTURES: dict[str, dict] = {
    "transformer_lm": dict(n_layer=6, n_embd=512, n_head=8, ffn_dim=2048, gating_dim=512),
    "transformer_lm_gpt": dict(n_layer=12, n_embd=768, n_head=12, ffn_dim=3072, gating_dim=768),
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, ffn_dim=512, gating_dim=128),
}

# fairseq's flag (underscored) -> the ModelConfig field it sets.
FAIRSEQ_MODEL_FLAGS: dict[str, str] = {
    "num_experts": "num_experts",
    "decoder_layers": "n_layer",
    "decoder_embed_dim": "n_embd",
    "decoder_attention_heads": "n_head",
    "decoder_ffn_embed_dim": "ffn_dim",
    "tokens_per_sample": "max_seq_len",
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "share_decoder_input_output_embed": "share_input_output_embed",
    "mean_pool_gating_network_encoder_dim": "gating_dim",
    "mean_pool_gating_network_dropout": "gating_dropout",
}
# ModelConfig fields that no single flag sets, as a user would name them.
_NO_FLAG = {"vocab_size": "vocabulary size",
            "gating": "learned prior (--method *lp)"}
_FLAG_OF = {model: fairseq for fairseq, model in FAIRSEQ_MODEL_FLAGS.items()}


def flag_of(model_field: str) -> str:
    """ModelConfig field -> how a user sets it: n_embd -> '--decoder-embed-dim'."""
    if model_field in _FLAG_OF:
        return "--" + _FLAG_OF[model_field].replace("_", "-")
    return _NO_FLAG.get(model_field, model_field)


def in_flag_names(message: str) -> str:
    """A ModelConfig error ('ModelConfig.n_embd (100) ...') worded with the flags instead."""
    return re.sub(r"ModelConfig\.(\w+)", lambda m: flag_of(m.group(1)), message)


@dataclass(frozen=True)
class Study:
    """One size of the study that the notebooks and `moelab demo` run."""

    train: dict  # `moelab train` options (flag names with underscores)
    data: dict  # how the bundled corpus is preprocessed (PreprocessConfig fields, and
    #             documents_per_domain: how many documents of each domain a quick preset keeps)
    num_experts: int  # K of the mixture methods (the bundled corpus has 7 domains)


STUDIES: dict[str, Study] = {
    # fairseq's transformer_lm (6 layers, 512 wide) at the original workflow's lr, a few minutes
    # on one GPU; K = 10 as there.
    "gpu": Study(
        train=dict(arch="transformer_lm", tokens_per_sample=512, max_tokens=16384, lr=7e-4,
                   warmup_updates=300, max_update=3000, dropout=0.1, log_interval=20,
                   validate_interval_updates=1000),
        data=dict(vocab_size=8000, valid_fraction=0.05, test_fraction=0.05),
        num_experts=10),
    # Sized so that `moelab demo` trains and evaluates all five methods, at equal updates and
    # each on to soft EM's compute (the comparison at equal FLOPs), within 12 minutes on 2 idle
    # cores (11.5, 2026-12-08). Soft EM, which backpropagates all K
    # experts every update, sets that budget. Dropout 0: a few hundred updates underfit, so
    # dropout would only slow learning. A small vocabulary keeps the output layer cheap; small
    # held-out shares keep the evaluation within budget.
    "cpu": Study(
        train=dict(arch="tiny", decoder_embed_dim=96, decoder_ffn_embed_dim=384,
                   decoder_attention_heads=4, mean_pool_gating_network_encoder_dim=96,
                   tokens_per_sample=128, max_tokens=1024, lr=3e-3, warmup_updates=50,
                   max_update=400, dropout=0.0, log_interval=10, validate_interval_updates=400),
        data=dict(vocab_size=2000, valid_fraction=0.02, test_fraction=0.04),
        num_experts=7),
    # Seconds, for CI: every code path, no meaningful numbers.
    "smoke": Study(
        train=dict(arch="tiny", decoder_layers=1, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
                   decoder_attention_heads=2, mean_pool_gating_network_encoder_dim=32,
                   tokens_per_sample=32, max_tokens=256, lr=3e-3, warmup_updates=2,
                   max_update=6, dropout=0.0, log_interval=1, validate_interval_updates=3),
        data=dict(vocab_size=400, valid_fraction=0.2, test_fraction=0.2,
                  documents_per_domain=8),
        num_experts=2),
}


@dataclass(frozen=True)
class BenchmarkPreset:
    """The model and batch `moelab bench` times."""

    arch: str  # an ARCHITECTURES name
    vocab_size: int  # tokenizer vocabulary (a real data-bin's, not the expert tokens)
    num_experts: int  # K
    tokens_per_sample: int  # T
    max_tokens: int  # tokens per batch (B = max_tokens // T full chunks)
    dropout: float


BENCHMARKS: dict[str, BenchmarkPreset] = {
    # a laptop-sized run: the tiny model on a bundled-corpus-sized vocabulary (preprocess default)
    "tiny": BenchmarkPreset("tiny", vocab_size=8000, num_experts=4, tokens_per_sample=128,
                            max_tokens=2048, dropout=0.1),
    # the original fairseq workflow's hMoEup command: transformer_lm, K=10, T=512, max-tokens
    # 3584, GPT-2's vocabulary
    "fairseq": BenchmarkPreset("transformer_lm", vocab_size=50257, num_experts=10,
                            tokens_per_sample=512, max_tokens=3584, dropout=0.1),
}
