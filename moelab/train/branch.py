"""Branching a mixture from a trained dense LM (`--finetune-from-model`), as c-BTM and BTX start
their experts from one dense model.

The K-expert model takes the dense model's whole network. Its K expert tokens all start from
the dense model's indicator token (the token it read at position 0, where a plain LM reads its
begin-of-sequence token), each moved by a small seeded perturbation so that the experts differ
from the first E-step on: with K identical experts every posterior would be uniform and hard
EM's argmax would always pick expert 0. The gating network (a learned prior), the optimizer and
the learning-rate schedule start fresh; the dense run's compute is carried over, so the
branched run's train_flops is what the whole model cost.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.model import MixtureLM
from moelab.presets import flag_of
from moelab.train.checkpoint import CheckpointError
from moelab.train.state import read_complete, tokenizer_sha256_of

# The perturbation's standard deviation: the scale a fresh token embedding is drawn at
# (moelab.model.transformer's init), small against a trained indicator token's own size.
PERTURBATION_STD = 0.02

# ModelConfig fields the dense model and the mixture must share (all but K and the gating).
SHARED_FIELDS = ("vocab_size", "n_layer", "n_embd", "n_head", "ffn_dim", "max_seq_len",
                 "share_input_output_embed")


def branch_from_dense(model: MixtureLM, path: str | Path, *, seed: int,
                      tokenizer_sha256: str | None) -> dict:
    """Copy the dense checkpoint at `path` into `model` (in place); -> what the run records of
    its parent: {"path", "num_updates", "train_flops", "train_seconds"} (None where the parent
    did not count them).

    Refused with a CheckpointError naming both values: a parent with K > 1, another shape or
    vocabulary, another tokenizer.
    """
    path = Path(path)
    parent = read_complete(path)
    saved = parent["model_config"]
    if saved.get("num_experts") != 1:
        raise CheckpointError(
            f"--finetune-from-model {path} has K = {saved.get('num_experts')} experts; a "
            "mixture branches from a dense (K = 1) checkpoint: train one with --method dense")
    ours = model.config
    for name in SHARED_FIELDS:
        if saved.get(name) != getattr(ours, name):
            raise CheckpointError(
                f"--finetune-from-model {path} has {flag_of(name)} = {saved.get(name)} but this "
                f"run has {getattr(ours, name)}; branch with the dense model's settings (or "
                "train a dense model with this run's)")
    theirs = tokenizer_sha256_of(parent)
    if tokenizer_sha256 and theirs and theirs != tokenizer_sha256:
        raise CheckpointError(
            f"--finetune-from-model {path} was trained with tokenizer sha256 {theirs[:12]}... "
            f"and this data-bin's is {tokenizer_sha256[:12]}...: the vocabularies differ; branch "
            "on the data-bin the dense model was trained on")
    weights = parent["model"]
    V, K = ours.vocab_size, ours.num_experts
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name.startswith("gating.") or (name == "transformer.lm_head.weight"
                                              and ours.share_input_output_embed):
                continue  # the learned prior starts fresh; a tied head is the embedding
            if name not in weights:
                raise CheckpointError(f"--finetune-from-model {path} lacks the weights {name}; "
                                      "use a checkpoint written by `moelab train`")
            source = weights[name]
            if name in ("transformer.tok_emb.weight", "transformer.lm_head.weight"):
                tensor[:V] = source[:V]
                indicator = source[V].float()  # the dense model's one expert token
                noise = torch.randn(K, indicator.numel(), generator=generator)
                moved = noise * PERTURBATION_STD if K > 1 else torch.zeros_like(noise)
                tensor[V:] = (indicator + moved).to(tensor.dtype)
            else:
                tensor.copy_(source)
    compute = parent.get("compute") or {}
    return {"path": str(path), "num_updates": int(parent.get("num_updates", 0)),
            "train_flops": compute.get("train_flops"),
            "train_seconds": compute.get("train_seconds")}
