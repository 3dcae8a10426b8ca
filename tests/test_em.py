"""Online EM: the method value, the soft-EM gradient, the dropout-free E-step, hard/soft M-steps."""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moelab.model import MixtureLM, ModelConfig
from moelab.train.method import METHODS, Method
from moelab.train.objectives import PosteriorLogSumExp, em_step
from moelab.train.scoring import ExpertScorer

V = 50


@dataclass
class TinyBatch:
    """The fields of moelab.data.Batch that em_step reads, built by hand."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    context: torch.Tensor
    context_lengths: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def make_model(K: int = 3, **overrides) -> MixtureLM:
    torch.manual_seed(0)
    base = dict(vocab_size=V, num_experts=K, n_layer=2, n_embd=32, n_head=4, ffn_dim=64,
                max_seq_len=16, dropout=0.0, gating=True, gating_dim=32)
    return MixtureLM(ModelConfig(**{**base, **overrides}))


def make_batch(seed: int = 1) -> TinyBatch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, V, (4, 10), generator=g)  # real tokens: 0, 1, 3 are inputs only
    lengths = torch.tensor([10, 8, 5, 1])
    tokens[torch.arange(10) >= lengths[:, None]] = 0
    context = torch.randint(1, V, (4, 6), generator=g)
    context_lengths = torch.tensor([6, 3, 0, 1])
    context[torch.arange(6) >= context_lengths[:, None]] = 0
    return TinyBatch(tokens, lengths, context, context_lengths)


def test_a_method_name_is_read_into_hard_or_soft_and_a_prior():
    def flags(name):
        method = Method.parse(name)
        return method.name, method.hard, method.uniform_prior

    assert flags("dense") == ("dense", True, True)
    assert flags("hMoEup") == ("hMoEup", True, True)
    assert flags("hMoElp") == ("hMoElp", True, False)
    assert flags("sMoEup") == ("sMoEup", False, True)
    assert flags("sMoElp") == ("sMoElp", False, False)
    with pytest.raises(ValueError) as err:
        Method.parse("hMoE")
    assert all(name in str(err.value) for name in METHODS)


def test_soft_em_gradient_is_minus_given_posterior():
    torch.manual_seed(0)
    scores = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    r = torch.rand(5, 4, dtype=torch.float64).softmax(-1)  # unrelated to the scores
    out = PosteriorLogSumExp.apply(scores, r)
    torch.testing.assert_close(out, -torch.logsumexp(scores, -1))
    grad_out = torch.randn(5, dtype=torch.float64)
    out.backward(grad_out)
    torch.testing.assert_close(scores.grad, -r * grad_out[:, None])
    # with r = softmax(l), the given-r gradient is the true gradient of -logsumexp
    scores = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    r = scores.detach().softmax(-1)
    assert torch.autograd.gradcheck(lambda s: PosteriorLogSumExp.apply(s, r), (scores,))
    # ... and with any other r it is not (gradcheck compares to finite differences)
    r_wrong = r.roll(1, dims=1)
    assert not torch.autograd.gradcheck(lambda s: PosteriorLogSumExp.apply(s, r_wrong),
                                        (scores,), raise_exception=False)


def test_e_step_is_dropout_free_and_restores_training_mode():
    model = make_model(dropout=0.5, gating_dropout=0.5).train()
    batch = make_batch()
    first = em_step(ExpertScorer(model), batch, Method.parse("sMoElp"))
    second = em_step(ExpertScorer(model), batch, Method.parse("sMoElp"))
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(first.responsibilities, second.responsibilities, rtol=0, atol=0)
    assert not first.responsibilities.requires_grad
    torch.testing.assert_close(first.responsibilities.sum(-1), torch.ones(4))
    # the M-step, by contrast, runs with dropout on
    assert first.loss.item() != second.loss.item()
    # an eval-mode model stays in eval mode
    model.eval()
    em_step(ExpertScorer(model), batch, Method.parse("hMoEup"))
    assert not model.training


def test_hard_em_updates_only_the_argmax_expert():
    # untied: with a tied output layer every expert row gets gradient through the softmax
    model = make_model(K=4, share_input_output_embed=False)
    batch = make_batch()
    batch.tokens[:] = batch.tokens[0]  # identical chunks -> one argmax expert for every row
    batch.lengths[:] = 10
    out = em_step(ExpertScorer(model), batch, Method.parse("hMoEup"))
    out.loss.backward()
    chosen = set(out.responsibilities.argmax(-1).tolist())
    grad = model.transformer.tok_emb.weight.grad[V:]  # (K, d): expert-token rows
    for k in range(4):
        assert (grad[k].abs().sum() > 0) == (k in chosen), (k, chosen)
    # uniform prior: the gating network is not used, so it gets no gradient
    assert all(p.grad is None for p in model.gating.parameters())


def test_hard_em_loss_scores_the_chosen_expert_and_trains_the_prior():
    model = make_model().eval()
    batch = make_batch()
    out = em_step(ExpertScorer(model), batch, Method.parse("hMoElp"))
    with torch.no_grad():
        ll = model.expert_log_likelihoods(batch.tokens, batch.lengths)
        prior = model.log_prior(batch.context, batch.context_lengths)
    z = (prior + ll).argmax(-1)
    expected = -(prior + ll).gather(1, z[:, None]).sum()
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.nll, -ll.gather(1, z[:, None]).sum(), atol=1e-4, rtol=1e-5)
    assert out.num_tokens == 24
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gating.parameters())


@pytest.mark.parametrize("method", ["sMoEup", "sMoElp"])
def test_soft_em_loss_is_marginal_nll_and_its_gradient_matches_autograd(method):
    # dropout 0: E-step and M-step scores agree, so r = softmax(l) and the custom gradient must
    # equal plain autograd through -logsumexp
    batch = make_batch()
    model = make_model()
    out = em_step(ExpertScorer(model), batch, Method.parse(method))
    out.loss.backward()
    reference = make_model()
    ll = reference.expert_log_likelihoods(batch.tokens, batch.lengths)
    prior = (torch.full_like(ll, -math.log(3)) if method == "sMoEup"
             else reference.log_prior(batch.context, batch.context_lengths))
    marginal = -torch.logsumexp(prior + ll, dim=-1).sum()  # -log K included
    marginal.backward()
    torch.testing.assert_close(out.loss.detach(), marginal.detach())
    torch.testing.assert_close(out.nll, marginal.detach())
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_one_expert_uniform_prior_is_the_plain_lm():
    model = make_model(K=1, gating=False).eval()
    batch = make_batch()
    inputs = torch.cat([torch.full((4, 1), V), batch.tokens[:, :-1]], dim=1)
    # written out: the real vocabulary's rows of the tied head, unk/bos/pad never predicted
    logits = model.transformer.hidden(inputs) @ model.transformer.tok_emb.weight[:V].t()
    logits[..., [0, 1, 3]] = -math.inf
    nll = F.cross_entropy(logits.flatten(0, 1), batch.tokens.flatten(), reduction="none")
    plain = torch.where(torch.arange(10) < batch.lengths[:, None], nll.view(4, 10), 0.0).sum()
    for method in ("hMoEup", "sMoEup"):
        out = em_step(ExpertScorer(model), batch, Method.parse(method))
        torch.testing.assert_close(out.loss.detach(), plain.detach(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.nll, plain.detach(), atol=1e-4, rtol=1e-5)
        assert out.responsibilities.shape == (4, 1)


def test_learned_prior_without_gating_network_is_an_error():
    with pytest.raises(ValueError, match="gating=True"):
        em_step(ExpertScorer(make_model(gating=False)), make_batch(), Method.parse("hMoElp"))


def test_the_scorer_is_checked_once_when_a_training_step_is_built():
    from moelab.train.update import EMStep

    model = make_model()
    with pytest.raises(ValueError, match="estep_tokens"):
        EMStep(model, Method.parse("hMoEup"), estep_tokens=0)
    with pytest.raises(ValueError, match="estep_dtype"):
        EMStep(model, Method.parse("hMoEup"), estep_dtype=torch.float64)


def test_the_scorer_reads_the_estep_off_the_m_step_where_exact_and_it_pays():
    model = make_model(K=3).train()  # dropout 0: the M-step's forward is the E-step's
    scorer = ExpertScorer(model)
    assert scorer.reuses_estep(hard=False)  # soft EM: one forward of B*K rows instead of two
    assert not scorer.reuses_estep(hard=True)  # hard EM: backward over B*K rows costs more
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not scorer.reuses_estep(hard=False)  # a bf16 M-step is not the float32 E-step
        with pytest.raises(ValueError, match="autocast"):
            ExpertScorer(model, reuse_estep=True).reuses_estep(hard=True)
    assert ExpertScorer(model, reuse_estep=True).reuses_estep(hard=True)
    assert not ExpertScorer(model, reuse_estep=False).reuses_estep(hard=False)
    assert not ExpertScorer(model, estep_tokens=4).reuses_estep(hard=False)
    with_dropout = make_model(K=3, dropout=0.1)
    assert not ExpertScorer(with_dropout.train()).reuses_estep(hard=False)
    assert ExpertScorer(with_dropout.eval()).reuses_estep(hard=False)  # eval: no dropout
    with pytest.raises(ValueError, match="K > 1"):
        ExpertScorer(make_model(K=1), reuse_estep=True)
    # the EM step gives the same numbers either way (test_bench checks the gradients)
    batch = make_batch()
    reused = em_step(scorer, batch, Method.parse("sMoElp"))
    separate = em_step(ExpertScorer(model, reuse_estep=False), batch, Method.parse("sMoElp"))
    torch.testing.assert_close(reused.loss, separate.loss, atol=1e-5, rtol=1e-5)


def test_uniform_prior_minus_log_k_is_in_the_hard_and_the_soft_loss():
    model = make_model(K=4, gating=False).eval()
    batch = make_batch()
    with torch.no_grad():
        ll = model.expert_log_likelihoods(batch.tokens, batch.lengths)  # (4, K)
    hard = em_step(ExpertScorer(model), batch, Method.parse("hMoEup"))
    z = ll.argmax(-1)
    # written out: -(log p(z*) + log p(x | z*)) with p(z) = 1/4
    expected = -(ll.gather(1, z[:, None]).squeeze(1) - math.log(4)).sum()
    torch.testing.assert_close(hard.loss.detach(), expected, atol=1e-4, rtol=1e-5)
    soft = em_step(ExpertScorer(model), batch, Method.parse("sMoEup"))
    marginal = -(torch.logsumexp(ll, -1) - math.log(4)).sum()  # log (1/K) sum_z p(x|z)
    torch.testing.assert_close(soft.loss.detach(), marginal, atol=1e-4, rtol=1e-5)


def test_soft_m_step_gradient_uses_the_dropout_free_posterior():
    """grad = sum_z r_z grad(-l_z), r from the E-step without dropout, l from the dropout pass.

    With dropout 0 the two posteriors agree and a wrong gradient would pass unnoticed, so this
    runs with dropout on; the reference replays the M-step's dropout masks from the same seed.
    """
    model = make_model(K=3, dropout=0.3, gating_dropout=0.3).train()
    batch = make_batch()
    with torch.no_grad():  # the E-step, written out: eval mode, no dropout
        model.eval()
        l_clean = (model.log_prior(batch.context, batch.context_lengths)
                   + model.expert_log_likelihoods(batch.tokens, batch.lengths))
        model.train()
    r = l_clean.softmax(-1)  # (B, K)

    torch.manual_seed(7)
    em_step(ExpertScorer(model), batch, Method.parse("sMoElp")).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def replay_grads(weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # the M-step's dropout masks: prior first, then the experts
        l_drop = (model.log_prior(batch.context, batch.context_lengths)
                  + model.expert_log_likelihoods(batch.tokens, batch.lengths))  # (B, K)
        w = l_drop.detach().softmax(-1) if weights is None else weights
        (-(w * l_drop).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = replay_grads(r)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)
    # the posterior of the dropout pass gives another gradient: the test can tell them apart
    noisy = replay_grads(None)
    assert any(not torch.allclose(got[n], noisy[n], atol=1e-6, rtol=1e-4) for n in got)


def test_hard_em_with_tied_embeddings_leaves_other_experts_rows_bit_identical():
    """Expert tokens are not output classes, so only the chosen experts' rows move."""
    K = 6
    model = make_model(K=K, dropout=0.1)  # tied input/output embeddings, as in fairseq's
    assert model.transformer.lm_head.weight is model.transformer.tok_emb.weight
    batch = make_batch()  # 4 chunks: at most 4 of the 6 experts are chosen
    before = model.transformer.tok_emb.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    out = em_step(ExpertScorer(model), batch, Method.parse("hMoEup"))
    out.loss.backward()
    optimizer.step()
    chosen = set(out.responsibilities.argmax(-1).tolist())
    assert len(chosen) < K
    after = model.transformer.tok_emb.weight.detach()
    for k in range(K):
        same = torch.equal(after[V + k], before[V + k])
        assert same == (k not in chosen), (k, chosen)
    # unk, bos and pad are inputs only: never targets, so their rows do not move either
    for special in (0, 1, 3):
        assert torch.equal(after[special], before[special]), special


def test_output_distribution_sums_to_one_over_real_tokens():
    """log p(x_t | prefix) for every possible target, scored one row each: the real tokens
    carry all the mass; expert tokens cannot be targets and unk, bos, pad get none."""
    model = make_model(K=3).eval()
    prefix = make_batch().tokens[0, :5]
    targets = torch.arange(V)  # every id of the real vocabulary
    rows = torch.cat([prefix.repeat(V, 1), targets[:, None]], dim=1)  # (V, 6)
    with torch.no_grad():
        logp = model.token_log_probs(rows, torch.full((V,), 6), torch.ones(V, dtype=torch.long))
    last = logp[:, -1].double()  # (V,) log p(target | <expert_1>, prefix)
    real = torch.ones(V, dtype=torch.bool)
    real[[0, 1, 3]] = False
    torch.testing.assert_close(last[real].exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.all(last[~real] == -math.inf)
    # generation samples from the same distribution
    with torch.no_grad():
        inputs = torch.cat([torch.tensor([V + 1]), prefix])[None]
        gen = F.log_softmax(model.next_token_logits(inputs).double(), -1)[0]  # (V,)
    torch.testing.assert_close(gen[real], last[real], atol=1e-5, rtol=1e-5)


def test_prior_reads_only_the_text_before_the_chunk_on_real_batches(tiny_bin):
    """On real TrainBatches rows: the context is the same document's text just before the chunk
    (never the chunk, never the previous document), and em_step's prior depends on it alone."""
    from moelab.data import BinarizedDataset, TrainBatches

    ds = BinarizedDataset(tiny_bin, "train")
    tb = TrainBatches(ds, tokens_per_sample=48, max_tokens=384, max_context=40, seed=2)
    starts = {}  # (doc, chunk text) -> start; written out from the document itself
    for c in tb.chunks:
        starts[(c.doc, ds.document(c.doc)[c.start : c.end].tobytes())] = c.start
    seen_middle = 0
    for position in range(tb.batches_per_epoch):
        batch = tb.batch(1, position)
        for row in range(len(batch)):
            doc = ds.document(int(batch.doc_ids[row]))
            n, m = int(batch.lengths[row]), int(batch.context_lengths[row])
            start = starts[(int(batch.doc_ids[row]), batch.tokens[row, :n].numpy().tobytes())]
            assert np.array_equal(batch.context[row, :m].numpy(), doc[max(0, start - 40) : start])
            seen_middle += start > 0
    assert seen_middle > 10  # the check ran on chunks that have a context

    model = make_model(K=3, vocab_size=ds.vocab_size, max_seq_len=48).eval()
    seen = []
    log_prior = model.log_prior

    def spy(context, lengths):
        out = log_prior(context, lengths)
        seen.append(out.detach().clone())
        return out

    model.log_prior = spy
    batch = tb.batch(1, 0)
    em_step(ExpertScorer(model), batch, Method.parse("hMoElp"))
    other_chunks = dataclasses.replace(batch, tokens=batch.tokens.roll(1, dims=0),
                                       lengths=batch.lengths.roll(1, dims=0))
    em_step(ExpertScorer(model), other_chunks, Method.parse("hMoElp"))
    other_context = dataclasses.replace(batch, context=(batch.context + 7) % ds.vocab_size)
    em_step(ExpertScorer(model), other_context, Method.parse("hMoElp"))
    # calls per em_step: E-step, then M-step; the chunk changed, the prior did not
    assert len(seen) == 6
    torch.testing.assert_close(seen[0], seen[2], rtol=0, atol=0)
    has_context = batch.context_lengths > 1
    assert has_context.any()
    assert not torch.allclose(seen[0][has_context], seen[4][has_context])
