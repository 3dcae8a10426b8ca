"""Presets live in moelab.presets, and the model's shape has one vocabulary (ModelConfig's
fields) with fairseq's flag names mapped to it in one table."""

from __future__ import annotations

import dataclasses

import pytest

from moelab.model import ModelConfig
from moelab.presets import ARCHITECTURES, FAIRSEQ_MODEL_FLAGS, STUDIES, flag_of
from moelab.train.config import ModelArgs, RunConfig, model_config

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}

# a value for each flag that no architecture has, so the flag is seen to reach the model
DISTINCT = {"decoder_layers": 3, "decoder_embed_dim": 48, "decoder_attention_heads": 3,
            "decoder_ffn_embed_dim": 80, "share_decoder_input_output_embed": False,
            "mean_pool_gating_network_encoder_dim": 24, "mean_pool_gating_network_dropout": 0.25,
            "dropout": 0.3, "attention_dropout": 0.2, "num_experts": 5}


def test_every_fairseq_model_flag_sets_the_model_field_the_table_names():
    assert set(FAIRSEQ_MODEL_FLAGS.values()) <= MODEL_FIELDS
    for flag, value in DISTINCT.items():
        # a width of 48 takes tiny's 4 heads and the 3 heads set here
        args = ModelArgs(arch="tiny", method="hMoElp", **{"decoder_embed_dim": 48, flag: value})
        config = model_config(args, vocab_size=100, pad_id=3, tokens_per_sample=40)
        assert getattr(config, FAIRSEQ_MODEL_FLAGS[flag]) == value, flag
    config = model_config(ModelArgs(arch="tiny"), vocab_size=100, pad_id=3, tokens_per_sample=40)
    assert config.max_seq_len == 40 == getattr(config, FAIRSEQ_MODEL_FLAGS["tokens_per_sample"])


def test_every_architecture_is_in_the_models_vocabulary_and_fills_what_flags_leave_unset():
    for arch, shape in ARCHITECTURES.items():
        assert set(shape) <= MODEL_FIELDS, arch
        config = model_config(ModelArgs(arch=arch, method="hMoElp"), vocab_size=100, pad_id=3,
                              tokens_per_sample=40)
        assert {k: getattr(config, k) for k in shape} == shape, arch


@pytest.mark.parametrize(("flags", "message"), [
    (dict(decoder_embed_dim=100, decoder_attention_heads=3),
     "--decoder-embed-dim (100) must be divisible by --decoder-attention-heads (3)"),
    (dict(decoder_layers=0), "--decoder-layers must be >= 1, got 0"),
    (dict(mean_pool_gating_network_dropout=1.0),
     "--mean-pool-gating-network-dropout must be in [0, 1)"),
    (dict(dropout=float("nan")), "--dropout must be in [0, 1)"),
])
def test_a_bad_shape_is_refused_in_the_flags_words(flags, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        ModelArgs(arch="tiny", **flags)


def test_flag_of_names_how_a_user_sets_each_shape_field():
    assert flag_of("n_embd") == "--decoder-embed-dim"
    assert flag_of("max_seq_len") == "--tokens-per-sample"
    assert flag_of("gating_dim") == "--mean-pool-gating-network-encoder-dim"


def test_every_study_preset_is_a_valid_training_run():
    for name, study in STUDIES.items():
        config = RunConfig.from_kwargs("data-bin", **study.train, num_experts=study.num_experts)
        assert config.model.num_experts == study.num_experts, name
        assert set(study.data) <= {"vocab_size", "valid_fraction", "test_fraction",
                                   "documents_per_domain"}, name


def test_the_fairseq_architectures_have_fairseqs_sizes():
    """--arch transformer_lm and transformer_lm_gpt promise fairseq's models (the original
    workflow's commands name them), so their sizes are pinned to fairseq's, not to whatever is
    here."""
    fairseq = {"transformer_lm": dict(n_layer=6, n_embd=512, n_head=8, ffn_dim=2048),
               "transformer_lm_gpt": dict(n_layer=12, n_embd=768, n_head=12, ffn_dim=3072)}
    for arch, sizes in fairseq.items():
        assert {k: ARCHITECTURES[arch][k] for k in sizes} == sizes, arch
