"""What a checkpoint holds (moelab.train.state): a trained run writes exactly the keys KEYS names,
a checkpoint without a key a reader or a resume needs is refused naming it, and each stateful
part gets back from its state dict what it put in."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from moelab.model import ModelConfig
from moelab.train import train
from moelab.train.assignment import PriorBias
from moelab.train.checkpoint import LAST, UnreadableCheckpoint, read_checkpoint, save_checkpoint
from moelab.train.meter import Meter
from moelab.train.state import (
    ALWAYS_WRITTEN,
    KEY_NAMES,
    KEYS,
    READ_KEYS,
    RESUME_KEYS,
    ProcessRNG,
    TrainState,
    build_model,
    check_resumable,
    in_schema,
    read_complete,
    restore_training,
    run_config,
)
from moelab.train.update import build_optimizer

SMALL = dict(arch="tiny", decoder_layers=1, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
             decoder_attention_heads=2, tokens_per_sample=32, max_tokens=192, warmup_updates=2,
             dropout=0.0, device="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def runs(tiny_bin, tmp_path_factory) -> dict:
    """A dense run (the keys every checkpoint has) and a mixture branched from it with a prior
    bias (every optional key too): their checkpoint_last files."""
    root = tmp_path_factory.mktemp("state")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: one thread is faster
    train(str(tiny_bin), method="dense", max_update=1, save_dir=str(root / "dense"), **SMALL)
    train(str(tiny_bin), method="hMoElp", num_experts=2, max_update=1, prior_bias_rate=0.01,
          finetune_from_model=str(root / "dense" / LAST), save_dir=str(root / "branched"),
          **SMALL)
    torch.set_num_threads(threads)
    return {"dense": root / "dense" / LAST, "branched": root / "branched" / LAST}


def test_a_trained_checkpoint_holds_exactly_the_keys_the_schema_names(runs):
    """Every key the trainer writes is in KEYS, in KEYS's order; a plain run writes the
    always-written ones and no other; a branched run with a prior bias writes them all."""
    dense = read_checkpoint(runs["dense"])
    assert list(dense) == list(ALWAYS_WRITTEN)
    branched = read_checkpoint(runs["branched"])
    assert list(branched) == list(KEY_NAMES)
    assert {key.name for key in KEYS if key.written != "always"} == {"prior_bias",
                                                                     "branched_from"}


# Written out, not read from the schema: a key dropped from READ_KEYS or RESUME_KEYS must fail
# here, not quietly take its own test away.
EVERY_READER_NEEDS = ("format", "model", "config", "model_config")
A_RESUME_NEEDS = ("optimizer", "rng", "data_position", "num_updates", "best_valid_loss")


def test_the_schema_says_which_keys_a_reader_and_a_resume_need():
    assert set(READ_KEYS) == set(EVERY_READER_NEEDS)
    assert set(RESUME_KEYS) == set(A_RESUME_NEEDS)


@pytest.mark.parametrize("key", EVERY_READER_NEEDS)
def test_a_checkpoint_missing_a_key_every_reader_needs_is_refused_naming_it(runs, tmp_path,
                                                                            key):
    checkpoint = read_checkpoint(runs["dense"])
    del checkpoint[key]
    path = tmp_path / LAST
    save_checkpoint(path, checkpoint)
    with pytest.raises(UnreadableCheckpoint, match=f"{path}.*{key}"):
        read_complete(path)


@pytest.mark.parametrize("key", A_RESUME_NEEDS)
def test_a_checkpoint_missing_a_key_a_resume_needs_is_refused_naming_it(runs, key):
    checkpoint = read_checkpoint(runs["dense"])
    model_config = ModelConfig(**checkpoint["model_config"])
    check_resumable(checkpoint, model_config, None, "ck.pt")  # complete: accepted
    del checkpoint[key]
    with pytest.raises(UnreadableCheckpoint, match=f"ck.pt cannot be resumed from: it lacks {key}"):
        check_resumable(checkpoint, model_config, None, "ck.pt")


def test_the_train_state_comes_back_from_its_state_dict():
    state = TrainState(num_updates=7, epoch=2, batch_in_epoch=3, best_valid_loss=4.5,
                       skipped_updates=1, bad_in_row=2, train_flops=1e9, train_seconds=3.0,
                       flops_from_update=2, branched_from={"path": "p", "num_updates": 5})
    saved = state.state_dict(world_size=1, wall_time=12.0)
    restored = TrainState()
    assert restored.load_state_dict(saved, world_size=1) == []
    expected = TrainState(**{**vars(state), "bad_in_row": 0, "wall_time": 12.0})
    assert restored == expected


def test_a_checkpoint_from_before_compute_was_counted_counts_from_its_update():
    saved = TrainState(num_updates=4).state_dict(world_size=1, wall_time=1.0)
    del saved["compute"]
    state = TrainState()
    notes = state.load_state_dict(saved, world_size=1)
    assert state.flops_from_update == 4 and state.train_flops == 0.0
    assert "before moelab counted compute" in notes[0]


def test_the_prior_bias_is_restored_in_place():
    bias = PriorBias(torch.tensor([0.5, -0.5]), rate=0.1)
    fresh = PriorBias(torch.zeros(2), rate=0.1)
    tensor = fresh.bias
    fresh.load_state_dict(bias.state_dict())
    assert fresh.bias is tensor and torch.equal(tensor, torch.tensor([0.5, -0.5]))


def test_the_random_generators_continue_from_their_state_dict():
    rng = ProcessRNG()
    saved = rng.state_dict()
    first = (torch.rand(3), torch.randn(2), random.random(), np.random.rand())
    rng.load_state_dict(saved)
    again = (torch.rand(3), torch.randn(2), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[2:] == again[2:] and not math.isnan(first[2])


def test_a_key_the_schema_does_not_name_or_a_missing_one_is_refused_when_saving():
    """in_schema is what build_checkpoint writes through: a part that writes an unknown key, or
    leaves out an always-written one, is a bug caught before the file exists."""
    parts = dict.fromkeys(ALWAYS_WRITTEN, 0)
    assert list(in_schema(parts)) == list(ALWAYS_WRITTEN)
    with pytest.raises(ValueError, match="extra_key unknown"):
        in_schema({**parts, "extra_key": 1})
    del parts["meter"]
    with pytest.raises(ValueError, match="meter missing"):
        in_schema(parts)


def test_each_rank_restores_its_own_meter_and_random_generators(runs):
    """A checkpoint of two ranks holds two meters and two RNG states: rank 1 resumes from the
    second of each, not from rank 0's."""
    checkpoint = read_checkpoint(runs["dense"])
    model, _ = build_model(checkpoint, runs["dense"])
    optimizer = build_optimizer(model, run_config(checkpoint, runs["dense"]), torch.device("cpu"))
    meters = [Meter(1, torch.device("cpu")) for _ in range(2)]
    for rank, meter in enumerate(meters):
        meter.sums.loss += 10.0 * (rank + 1)
    rngs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        rngs.append(ProcessRNG().state_dict())
    expected = torch.rand(4)  # what rank 1's generator gives next
    checkpoint.update(meter=[m.state_dict() for m in meters], rng=rngs,
                      data_position={**checkpoint["data_position"], "world_size": 2})
    meter = Meter(1, torch.device("cpu"))
    restored = restore_training(checkpoint, runs["dense"], model=model, optimizer=optimizer,
                                meter=meter, rng=ProcessRNG(), rank=1, world_size=2,
                                prior_bias_rate=0.0)
    assert restored.meter_restored and float(meter.sums.loss) == 20.0
    assert torch.equal(torch.rand(4), expected)
