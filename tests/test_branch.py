"""--finetune-from-model: a mixture branched from a dense checkpoint takes its network, starts its
experts apart, counts its compute, and refuses a parent that does not fit."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import MoelabError
from moelab.train import RunConfig, train
from moelab.train.branch import PERTURBATION_STD
from moelab.train.checkpoint import LAST, read_checkpoint
from moelab.train.distributed import DistInfo
from moelab.train.trainer import Trainer

T = 32
SMALL = dict(arch="tiny", decoder_layers=1, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
             decoder_attention_heads=2, mean_pool_gating_network_encoder_dim=32,
             tokens_per_sample=T, max_tokens=192, warmup_updates=2, lr=3e-3, dropout=0.0,
             device="cpu", progress_bar=False, log_interval=1)


@pytest.fixture(scope="module")
def dense(tiny_bin, tmp_path_factory):
    """A dense model trained 6 updates: the parent every test branches from."""
    save_dir = tmp_path_factory.mktemp("dense") / "run"
    train(str(tiny_bin), method="dense", max_update=6, save_dir=str(save_dir), **SMALL)
    return save_dir / LAST


def _branched(tiny_bin, parent, save_dir, *, method="hMoElp", K=3, seed=1, **overrides):
    """A Trainer after resume(): the branched model before its first update."""
    config = RunConfig.from_kwargs(str(tiny_bin), method=method, num_experts=K, max_update=2,
                                   seed=seed, save_dir=str(save_dir),
                                   finetune_from_model=str(parent), **{**SMALL, **overrides})
    trainer = Trainer(config, DistInfo())
    trainer.resume()
    return trainer


@pytest.mark.usefixtures("one_thread")
def test_a_branch_takes_the_dense_network_and_starts_its_experts_apart(tiny_bin, dense,
                                                                        tmp_path):
    parent = read_checkpoint(dense)["model"]
    trainer = _branched(tiny_bin, dense, tmp_path / "a")
    model, V = trainer.model, trainer.model_config.vocab_size
    ours = model.state_dict()
    for name, weights in parent.items():
        if name != "transformer.tok_emb.weight" and name != "transformer.lm_head.weight":
            torch.testing.assert_close(ours[name], weights, rtol=0, atol=0, msg=name)
    embedding = ours["transformer.tok_emb.weight"]
    torch.testing.assert_close(embedding[:V], parent["transformer.tok_emb.weight"][:V],
                               rtol=0, atol=0)
    moved = embedding[V:] - parent["transformer.tok_emb.weight"][V]  # (K, d)
    assert moved.shape[0] == 3
    assert moved.std().item() == pytest.approx(PERTURBATION_STD, rel=0.3)  # small, not zero
    assert torch.cdist(moved, moved).fill_diagonal_(1.0).min() > 0  # every pair differs
    # the experts therefore score a chunk differently from the first E-step on
    tokens = torch.randint(4, V, (2, T))
    ll = model.expert_log_likelihoods(tokens, torch.tensor([T, T]))
    assert (ll.max(1).values - ll.min(1).values > 1e-4).all()
    # a fresh gating network (the one a run from scratch builds with this seed), a fresh
    # optimizer and schedule
    scratch = Trainer(RunConfig.from_kwargs(str(tiny_bin), method="hMoElp", num_experts=3,
                                            max_update=2, save_dir=str(tmp_path / "s"),
                                            **SMALL), DistInfo())
    for name, weights in scratch.model.state_dict().items():
        if name.startswith("gating."):
            torch.testing.assert_close(ours[name], weights, rtol=0, atol=0, msg=name)
    assert trainer.state.num_updates == 0 and not trainer.optimizer.state


@pytest.mark.usefixtures("one_thread")
def test_the_perturbation_is_seeded(tiny_bin, dense, tmp_path):
    def expert_rows(seed, folder):
        trainer = _branched(tiny_bin, dense, tmp_path / folder, seed=seed)
        return trainer.model.transformer.tok_emb.weight[trainer.model_config.vocab_size:]

    same = expert_rows(1, "a"), expert_rows(1, "b")
    torch.testing.assert_close(*same, rtol=0, atol=0)
    assert not torch.equal(same[0], expert_rows(2, "c"))


@pytest.mark.usefixtures("one_thread")
def test_a_branched_run_counts_the_dense_compute_and_records_its_parent(tiny_bin, dense,
                                                                        tmp_path):
    """train_flops of the branched run starts where the dense run's ended, so --max-flops is a
    budget for the whole model; the checkpoint names its parent."""
    parent = read_checkpoint(dense)
    result = train(str(tiny_bin), method="hMoEup", num_experts=3, max_update=2,
                   finetune_from_model=str(dense), save_dir=str(tmp_path / "b"), **SMALL)
    train_lines = result.history[result.history["kind"] == "train"]
    first = float(train_lines["train_flops"].iloc[0])
    dense_flops = parent["compute"]["train_flops"]
    assert dense_flops < first < 2 * dense_flops  # one mixture update on top of six dense ones
    saved = read_checkpoint(tmp_path / "b" / LAST)
    assert saved["branched_from"]["num_updates"] == 6
    assert saved["branched_from"]["train_flops"] == dense_flops
    assert saved["num_updates"] == 2


@pytest.mark.usefixtures("one_thread")
def test_a_resume_ignores_the_parent(tiny_bin, dense, tmp_path, capsys):
    options = dict(method="hMoEup", num_experts=3, finetune_from_model=str(dense),
                   save_dir=str(tmp_path / "r"), **SMALL)
    train(str(tiny_bin), max_update=2, **options)
    first = read_checkpoint(tmp_path / "r" / LAST)["model"]["transformer.tok_emb.weight"]
    result = train(str(tiny_bin), max_update=3, **options)
    assert result.num_updates == 3
    assert "is ignored" in capsys.readouterr().err
    assert first.shape[0] == read_checkpoint(tmp_path / "r" / LAST)["model"][
        "transformer.tok_emb.weight"].shape[0]


@pytest.mark.usefixtures("one_thread")
def test_a_parent_that_does_not_fit_is_refused_naming_both(tiny_bin, dense, tmp_path,
                                                          tiny_corpus):
    with pytest.raises(MoelabError, match=r"--decoder-embed-dim = 32 but this run has 48"):
        _branched(tiny_bin, dense, tmp_path / "w", decoder_embed_dim=48,
                  mean_pool_gating_network_encoder_dim=48)
    mixture = tmp_path / "mix"
    train(str(tiny_bin), method="hMoEup", num_experts=2, max_update=1, save_dir=str(mixture),
          **SMALL)
    with pytest.raises(MoelabError, match="K = 2 experts; a mixture branches from a dense"):
        _branched(tiny_bin, mixture / LAST, tmp_path / "k")
    # another tokenizer with the same vocabulary size: every id would mean another piece
    from moelab.data import PreprocessConfig, preprocess

    other = tmp_path / "other-bin"
    preprocess(PreprocessConfig(destdir=str(other), data=str(tiny_corpus), vocab_size=512,
                                valid_fraction=0.3, test_fraction=0.15))  # other train text
    with pytest.raises(MoelabError, match="tokenizer sha256"):
        _branched(other, dense, tmp_path / "t")
    # nothing was written for the refused runs
    assert not (tmp_path / "w" / LAST).exists() and not (tmp_path / "k" / LAST).exists()
