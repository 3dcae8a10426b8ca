"""Transformer, gating network and MixtureLM: shapes, batched scoring, padding, no prior leakage."""

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.model import MixtureLM, ModelConfig, config_from_preset
from moelab.presets import ARCHITECTURES

V, K = 50, 3


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, num_experts=K, n_layer=2, n_embd=32, n_head=4, ffn_dim=64,
                max_seq_len=16, dropout=0.0, gating=True, gating_dim=32)
    return ModelConfig(**{**base, **overrides})


def make_model(**overrides) -> MixtureLM:
    torch.manual_seed(0)
    return MixtureLM(tiny_config(**overrides)).eval()


def random_tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # 4..V-1: never unk 0, bos 1 or pad 3 (inputs only, not in the output distribution)
    return torch.randint(4, V, (B, T), generator=g)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible by ModelConfig.n_head"):
        tiny_config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="num_experts"):
        tiny_config(num_experts=0)
    with pytest.raises(ValueError, match="pad_id"):
        tiny_config(pad_id=V)
    with pytest.raises(ValueError, match="dropout"):
        tiny_config(dropout=1.0)


def test_presets_and_overrides():
    assert set(ARCHITECTURES) >= {"transformer_lm", "transformer_lm_gpt", "tiny"}
    cfg = config_from_preset("transformer_lm", vocab_size=100, num_experts=10)
    assert (cfg.n_layer, cfg.n_embd, cfg.ffn_dim, cfg.n_head) == (6, 512, 2048, 8)
    gpt = config_from_preset("transformer_lm_gpt", vocab_size=100)
    assert (gpt.n_layer, gpt.n_embd, gpt.ffn_dim, gpt.n_head) == (12, 768, 3072, 12)
    assert config_from_preset("tiny", vocab_size=100, n_layer=3).n_layer == 3
    with pytest.raises(ValueError, match="transformer_lm_gpt"):
        config_from_preset("gpt5", vocab_size=100)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        config_from_preset("tiny", vocab_size=100, n_layers=3)


def test_forward_shapes_expert_tokens_and_tied_embeddings():
    model = make_model()
    assert [model.expert_token_id(k) for k in range(K)] == [V, V + 1, V + 2]
    with pytest.raises(ValueError):
        model.expert_token_id(K)
    assert model.transformer.tok_emb.weight.shape == (V + K, 32)
    assert model.transformer.lm_head.weight is model.transformer.tok_emb.weight
    untied = make_model(share_input_output_embed=False)
    assert untied.transformer.lm_head.weight is not untied.transformer.tok_emb.weight
    logits = model(torch.cat([torch.full((2, 1), V), random_tokens(2, 7)], dim=1))
    assert logits.shape == (2, 8, V)  # the real vocabulary: expert tokens are never targets
    with pytest.raises(ValueError, match="max_seq_len"):
        model(random_tokens(1, 17))


def test_batched_scoring_equals_one_expert_at_a_time():
    model = make_model()
    tokens, lengths = random_tokens(4, 10), torch.tensor([10, 7, 3, 1])
    batched = model.expert_log_likelihoods(tokens, lengths)  # (B, K), one forward
    assert batched.shape == (4, K) and batched.dtype == torch.float32
    for k in range(K):
        # a separate forward per expert, cross-entropy written out by hand
        inputs = torch.cat([torch.full((4, 1), V + k), tokens[:, :-1]], dim=1)
        logp = F.log_softmax(model(inputs), dim=-1).gather(2, tokens[..., None]).squeeze(2)
        mask = torch.arange(10) < lengths[:, None]
        torch.testing.assert_close(batched[:, k], (logp * mask).sum(1), atol=1e-5, rtol=1e-5)
    # different expert tokens really give different likelihoods
    assert not torch.allclose(batched[:, 0], batched[:, 1])


def test_padding_does_not_change_log_likelihood():
    model = make_model()
    tokens = random_tokens(2, 12)
    padded = tokens.clone()
    padded[1, 5:] = 0  # row 1 is 5 real tokens then padding
    together = model.expert_log_likelihoods(padded, torch.tensor([12, 5]))
    alone = model.expert_log_likelihoods(tokens[1:, :5], torch.tensor([5]))
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=1e-5)
    # what stands in the padding is irrelevant
    padded[1, 5:] = 7
    torch.testing.assert_close(model.expert_log_likelihoods(padded, torch.tensor([12, 5])),
                               together, atol=1e-6, rtol=1e-6)


def test_log_prior_never_sees_the_chunk_and_reads_the_context():
    model = make_model()
    context, context_lengths = random_tokens(3, 6, seed=2), torch.tensor([6, 2, 0])
    prior = model.log_prior(context, context_lengths)
    assert prior.shape == (3, K) and prior.dtype == torch.float32
    torch.testing.assert_close(prior.exp().sum(-1), torch.ones(3))
    # the signature takes no chunk; changing the chunk cannot change the prior, and the
    # gating network's output does not depend on anything scored before it
    model.expert_log_likelihoods(random_tokens(3, 8, seed=3), torch.tensor([8, 8, 8]))
    torch.testing.assert_close(model.log_prior(context, context_lengths), prior)
    # changing the context changes it; padding beyond context_lengths does not
    other = context.clone()
    other[0, 0] = (other[0, 0] % (V - 1)) + 1
    assert not torch.allclose(model.log_prior(other, context_lengths)[0], prior[0])
    other = context.clone()
    other[1, 2:] = 9
    torch.testing.assert_close(model.log_prior(other, context_lengths), prior)
    # empty context (C = 0) gives the unconditional prior, same as a zero-length row
    empty = model.log_prior(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(empty, prior[2:].expand(3, K))
    assert torch.isfinite(empty).all()


def test_uniform_prior_without_gating_and_projection_when_dims_differ():
    model = make_model(gating=False)
    prior = model.log_prior(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(prior, torch.full((2, K), -math.log(K)))
    wide = make_model(gating_dim=48)  # n_embd = 32 -> projected to 48
    assert wide.log_prior(random_tokens(2, 4), torch.tensor([4, 1])).shape == (2, K)


def test_scores_are_float32_under_bf16_autocast():
    model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ll = model.expert_log_likelihoods(random_tokens(2, 6), torch.tensor([6, 4]))
        prior = model.log_prior(random_tokens(2, 3), torch.tensor([3, 0]))
    assert ll.dtype == torch.float32 and prior.dtype == torch.float32
    torch.testing.assert_close(
        ll, model.expert_log_likelihoods(random_tokens(2, 6), torch.tensor([6, 4])),
        atol=0.5, rtol=0.05)
