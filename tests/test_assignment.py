"""The remedies against collapse (moelab.train.assignment): Sinkhorn balance, the prior bias,
annealing; how they reach the EM step, the flags, the checkpoint and a resume."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from moelab.cli import main
from moelab.errors import MoelabError
from moelab.train import RunConfig, read_history, train
from moelab.train.assignment import (
    SINKHORN_MAX_ITERATIONS,
    SINKHORN_TOLERANCE,
    Assignment,
    PriorBias,
    anneal_temperature,
    balanced_choice,
    build_assignment,
    sinkhorn,
)
from moelab.train.checkpoint import LAST, read_checkpoint
from moelab.train.distributed import DistInfo
from moelab.train.method import Method
from moelab.train.objectives import em_step
from moelab.train.scoring import ExpertScorer
from tests.test_em import make_batch, make_model

OLD_RUN = Path(__file__).parent / "fixtures" / "run_v1"
TINY = dict(arch="tiny", decoder_layers=2, decoder_embed_dim=64, decoder_ffn_embed_dim=128,
            decoder_attention_heads=4, tokens_per_sample=64, device="cpu", progress_bar=False)
REMEDIES = dict(balance="sinkhorn", prior_bias_rate=0.05, estep_temperature=3.0,
                anneal_updates=6)


def _scores(B: int, K: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, K, generator=torch.Generator().manual_seed(seed)) * 3  # (B, K)


# --------------------------------------------------------------------------- sinkhorn


def _collapsed(B: int, K: int, low: float, high: float, seed: int = 0) -> torch.Tensor:
    """Scores (B, K) where every chunk prefers expert 0, by margins from `low` to `high` nats."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, K, generator=generator) * 3
    scores[:, 0] += torch.linspace(low, high, B)[torch.randperm(B, generator=generator)]
    return scores


def _deviation(plan: torch.Tensor) -> float:
    """The largest relative deviation of a column sum from B / K."""
    B, K = plan.shape
    return float((plan.double().sum(0) / (B / K) - 1).abs().max())


def test_sinkhorn_plan_has_rows_one_and_columns_b_over_k():
    plan, residual, _ = sinkhorn(_scores(12, 3))
    torch.testing.assert_close(plan.sum(1), torch.ones(12))  # each row a posterior
    assert _deviation(plan) < SINKHORN_TOLERANCE
    assert residual == pytest.approx(_deviation(plan), abs=1e-6)


def test_sinkhorn_balances_a_batch_that_prefers_one_expert_by_hundreds_of_nats():
    """B = 8, K = 7, expert 0 ahead by 50-500 nats: 3 iterations left column sums of about
    [4.0, 0.6, 0.4, ...] against 8 / 7; iterating to the tolerance balances them."""
    scores = _collapsed(8, 7, 50, 500)
    plan, residual, iterations = sinkhorn(scores)
    assert residual < SINKHORN_TOLERANCE and _deviation(plan) < SINKHORN_TOLERANCE
    assert 3 < iterations < SINKHORN_MAX_ITERATIONS
    few = sinkhorn(scores, max_iterations=3)
    assert few.iterations == 3 and few.plan.sum(0)[0] > 2.5 and few.residual > 1


def test_the_cap_stops_sinkhorn_and_the_residual_shows_how_far_it_got():
    plan, residual, iterations = sinkhorn(_collapsed(8, 7, 50, 500), max_iterations=20)
    assert iterations == 20
    assert residual == pytest.approx(_deviation(plan), rel=1e-5) and residual > 0.1
    for cap in (0, 1, 2):  # the residual is the returned plan's, where each iteration counts
        plan, residual, iterations = sinkhorn(_scores(12, 3), max_iterations=cap)
        assert iterations == cap and residual == pytest.approx(_deviation(plan), rel=1e-5)


def test_sinkhorn_keeps_the_argmax_of_an_already_balanced_batch():
    K = 3
    # each expert preferred by 4 of 12 chunks, in no order (a round robin would not pass)
    preferred = torch.randperm(12, generator=torch.Generator().manual_seed(0)) % K
    scores = _scores(12, K, seed=1) * 0.3 + 4 * torch.nn.functional.one_hot(preferred, K)
    plan = sinkhorn(scores).plan
    assert torch.equal(plan.argmax(1), scores.argmax(1))
    assert torch.equal(plan.argmax(1), preferred)


def test_sinkhorn_spreads_a_collapsed_batch_over_the_experts():
    """Every chunk prefers expert 0 by 300 nats (its rivals' posteriors underflow to 0 in
    float32): the plan still gives each expert a share of the chunks."""
    K, B = 3, 12
    scores = _scores(B, K, seed=2)
    scores[:, 0] += 300
    assert (scores.softmax(-1).argmax(1) == 0).all()
    plan = sinkhorn(scores).plan
    won = torch.bincount(plan.argmax(1), minlength=K)
    assert (won >= B // (2 * K)).all(), won
    assert torch.isfinite(plan).all()


@pytest.mark.slow
@pytest.mark.parametrize("hard", [True, False])
def test_margins_of_800_nats_give_a_finite_balanced_plan_and_the_strongest_choice(hard):
    """exp(-800) underflows even in float64: the column sums need their maximum taken out
    first, or the plan is nan and the hard choice arbitrary. Chunks that all prefer expert 0 by
    800-1000 nats: expert 0 keeps the two it is surest of, the others share the rest."""
    K, B = 3, 6
    scores = _collapsed(B, K, 800, 1000, seed=4)
    plan, residual, _ = sinkhorn(scores)
    assert torch.isfinite(plan).all() and residual < SINKHORN_TOLERANCE
    r = Assignment(balance="sinkhorn", hard=hard).posterior(scores)
    assert torch.isfinite(r).all()
    surest = set(torch.topk(scores[:, 0] - scores[:, 1:].max(1).values, 2).indices.tolist())
    if hard:
        assert torch.bincount(r.argmax(1), minlength=K).tolist() == [2, 2, 2]
        assert set(torch.nonzero(r.argmax(1) == 0).flatten().tolist()) == surest
    else:
        assert set(torch.topk(r[:, 0], 2).indices.tolist()) == surest
        assert _deviation(r) < SINKHORN_TOLERANCE


def test_a_plan_of_scores_that_are_not_finite_is_refused():
    """A nan in the scores must not become a silent, arbitrary choice."""
    scores = _scores(6, 3)
    scores[2, 1] = float("nan")
    for hard in (True, False):
        with pytest.raises(MoelabError, match="not finite"):
            Assignment(balance="sinkhorn", hard=hard).posterior(scores)


def test_the_log_shows_the_largest_residual_and_iterations_since_the_last_line():
    assignment = Assignment(balance="sinkhorn")
    assert "sinkhorn_residual" not in assignment.log_fields()  # no plan made yet
    easy, hard = _scores(12, 3), _collapsed(12, 3, 20, 60)
    for scores in (easy, hard, easy):
        assignment.posterior(scores)
    worst = sinkhorn(hard)
    assert worst.iterations > sinkhorn(easy).iterations
    fields = assignment.log_fields()
    assert fields["sinkhorn_residual"] == max(worst.residual, sinkhorn(easy).residual)
    assert fields["sinkhorn_iterations"] == worst.iterations
    assert "sinkhorn_residual" not in assignment.log_fields()  # counted afresh after a line
    assignment.posterior(easy)
    assert assignment.log_fields()["sinkhorn_iterations"] == sinkhorn(easy).iterations


def test_hard_em_spreads_a_batch_of_alike_chunks_with_each_expert_capped():
    """Identical chunks that all prefer expert 0: the balanced plan is uniform, so its argmax
    alone would send every chunk to expert 0; the capped choice gives each expert B / K."""
    K, B = 4, 12
    scores = torch.zeros(B, K)
    scores[:, 0] = 50.0
    balanced = Assignment(balance="sinkhorn", hard=True)
    r = balanced.posterior(scores)
    assert torch.equal(r.sum(1), torch.ones(B))  # one expert per chunk
    assert torch.bincount(r.argmax(1), minlength=K).tolist() == [B // K] * K
    # soft EM keeps the plan itself
    plan = Assignment(balance="sinkhorn").posterior(scores)
    assert torch.allclose(plan.sum(0), torch.full((K,), B / K, dtype=plan.dtype), atol=1e-4)


def test_the_capped_choice_is_the_argmax_where_the_plan_already_balances():
    plan = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    assert balanced_choice(plan).tolist() == [0, 1, 0, 1]
    # over capacity, the weakest claims move: expert 0 takes its two strongest chunks
    crowded = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    assert balanced_choice(crowded).tolist() == [0, 1, 0, 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sinkhorn_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        scores = _scores(8, 2, seed=rank).abs()  # rank 0's chunks prefer expert 0, rank 1's 1
        scores[:, rank] += 5 + 30 * rank
        plan, residual, iterations = sinkhorn(scores, dist=DistInfo(rank=rank, world_size=2))
        # rank 1's chunks prefer their expert by far more: the ranks' own sums would stop at
        # different iterations, the all-reduced ones stop both at the same
        torch.save({"plan": plan, "residual": residual, "iterations": iterations},
                   os.path.join(out_dir, f"plan{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_sinkhorn_shares_are_global_over_ddp_ranks(tmp_path):
    """Two ranks with opposite preferences balance each other: each keeps its chunks on its
    expert, where shares counted per rank would move half of them to the other."""
    mp.spawn(_sinkhorn_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"plan{r}.pt", weights_only=True) for r in range(2)]
    plans = [o["plan"] for o in out]
    for rank, plan in enumerate(plans):
        assert (plan.argmax(1) == rank).all(), (rank, plan)
    total = plans[0].sum(0) + plans[1].sum(0)  # 16 chunks, 8 per expert over both ranks
    assert float((total / 8 - 1).abs().max()) < SINKHORN_TOLERANCE
    assert out[0]["iterations"] == out[1]["iterations"] and out[0]["residual"] == out[1]["residual"]


# --------------------------------------------------------------------------- prior bias


def test_prior_bias_rises_for_idle_experts_and_falls_for_busy_ones():
    bias = PriorBias(torch.zeros(4), rate=0.1)
    bias.update(torch.tensor([10, 0, 2, 4]))  # mean load 4
    torch.testing.assert_close(bias.bias, torch.tensor([-0.1, 0.1, 0.1, 0.0]))
    bias.update(torch.tensor([10, 0, 2, 4]))
    torch.testing.assert_close(bias.bias, torch.tensor([-0.2, 0.2, 0.2, 0.0]))
    assert bias.spread() == pytest.approx(0.4)


@pytest.mark.parametrize("method", ["hMoElp", "sMoElp"])
def test_prior_bias_chooses_but_is_not_in_the_loss(method):
    """A bias that makes every chunk choose expert 2 changes what is trained, never the loss:
    hard EM's loss is expert 2's unbiased -l_2, soft EM's the unbiased marginal."""
    model, batch = make_model(K=3), make_batch()
    scorer = ExpertScorer(model)
    plain = em_step(scorer, batch, Method.parse(method))
    biased = Assignment(prior_bias=PriorBias(torch.tensor([0.0, 0.0, 1e4]), rate=0.1))
    out = em_step(scorer, batch, Method.parse(method), assignment=biased)
    assert (out.responsibilities.argmax(1) == 2).all()
    assert not (plain.responsibilities.argmax(1) == 2).all()
    if Method.parse(method).hard:
        with torch.no_grad():
            log_prior, log_lik = scorer.scores(batch, Method.parse(method)).m_step()
        torch.testing.assert_close(out.loss.detach(), -(log_prior + log_lik)[:, 2].sum())
    else:
        torch.testing.assert_close(out.loss.detach(), plain.loss.detach())


# --------------------------------------------------------------------------- annealing


def test_annealing_flattens_at_t0_and_is_exactly_softmax_at_update_n():
    assert anneal_temperature(3.0, 10, 0) == 3.0
    assert anneal_temperature(3.0, 10, 5) == pytest.approx(2.0)  # linear
    assert anneal_temperature(3.0, 10, 10) == 1.0 and anneal_temperature(3.0, 10, 99) == 1.0
    scores = _scores(6, 3)
    assignment = build_assignment(balance="none", prior_bias_rate=0.0, estep_temperature=3.0,
                                  anneal_updates=10, bias=None, dist=DistInfo())

    def entropy(p: torch.Tensor) -> float:
        return float(-(p * p.log()).sum())

    assignment.start_update(0)
    assert entropy(assignment.posterior(scores)) > entropy(scores.softmax(-1)) + 0.5
    assignment.start_update(10)
    assert torch.equal(assignment.posterior(scores), scores.softmax(-1))


def test_the_bias_is_added_before_the_temperature_and_the_balance_comes_last():
    """bias, temper, balance: the hot start flattens the biased scores (the bias is a part of
    the log prior, which the temperature divides with the rest), and Sinkhorn balances the
    tempered posterior, not a posterior tempered after balancing."""
    scores = torch.zeros(4, 3)
    scores[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    bias = torch.tensor([2.0, 0.0, -1.0])

    def assignment(**options) -> Assignment:
        a = Assignment(prior_bias=PriorBias(bias.clone(), rate=0.1), estep_temperature=4.0,
                       anneal_updates=10, **options)
        a.start_update(0)  # T = 4
        return a

    torch.testing.assert_close(assignment().posterior(scores), ((scores + bias) / 4).softmax(-1))
    assert not torch.allclose(assignment().posterior(scores), (scores / 4 + bias).softmax(-1))
    plan = assignment(balance="sinkhorn").posterior(scores)
    torch.testing.assert_close(plan, sinkhorn((scores + bias) / 4).plan)
    tempered_after = sinkhorn(scores).plan.log().div(4).softmax(-1)
    assert not torch.allclose(plan, tempered_after, atol=1e-3)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("options, message", [
    (dict(method="hMoEup", prior_bias_rate=0.1), "has a uniform prior"),
    (dict(method="sMoEup", prior_bias_rate=0.1), "has a uniform prior"),
    (dict(method="dense", balance="sinkhorn"), "with one expert"),
    (dict(method="hMoElp", num_experts=1, estep_temperature=2.0, anneal_updates=4),
     "with one expert"),
    (dict(estep_temperature=0.0, anneal_updates=4), "must be > 0"),
    (dict(estep_temperature=-1.0, anneal_updates=4), "must be > 0"),
    (dict(anneal_updates=4), "anneals nothing"),
    (dict(method="hMoEup", estep_temperature=2.0, anneal_updates=4), "nothing with hard EM"),
    (dict(method="hMoElp", estep_temperature=2.0, anneal_updates=4), "nothing with hard EM"),
    (dict(estep_temperature=2.0), "needs --anneal-updates"),
    (dict(method="hMoElp", prior_bias_rate=-0.1), "must be >= 0"),
    (dict(method="hMoElp", prior_bias_rate=float("nan")), "finite"),
    (dict(balance="greedy"), "--balance must be one of none, sinkhorn"),
])
def test_a_remedy_where_it_means_nothing_is_refused_saying_why(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_kwargs("bin", max_update=1, **options)


@pytest.mark.parametrize("options", [
    dict(method="sMoEup", estep_temperature=2.0, anneal_updates=4),
    dict(method="hMoElp", estep_temperature=2.0, anneal_updates=4, balance="sinkhorn"),
])
def test_annealing_is_accepted_where_the_temperature_changes_what_is_trained(options):
    """Soft EM trains softmax(l / T) itself; hard EM with a balance trains the plan's choice,
    which depends on T."""
    assert RunConfig.from_kwargs("bin", max_update=1, **options).train.anneal_updates == 4


def test_the_remedies_are_train_flags_with_their_refusals(tiny_bin, capsys):
    assert main(["train", str(tiny_bin), "--max-update", "1", "--method", "hMoEup",
                 "--prior-bias-rate", "0.1"]) == 2
    assert "--method hMoEup has a uniform prior" in capsys.readouterr().err
    assert main(["train", str(tiny_bin), "--max-update", "1", "--balance", "sinkhorn",
                 "--method", "dense"]) == 2
    assert "with one expert" in capsys.readouterr().err


@pytest.mark.slow
def test_defaults_leave_every_number_unchanged(tiny_bin, tmp_path):
    """Off by default: no Assignment, so em_step's posterior is softmax(l) itself, and neither
    the checkpoint nor the log gains a key."""
    t = RunConfig.from_kwargs("bin", max_update=1).train
    assert build_assignment(balance=t.balance, prior_bias_rate=t.prior_bias_rate,
                            estep_temperature=t.estep_temperature,
                            anneal_updates=t.anneal_updates, bias=None, dist=DistInfo()) is None
    model, batch = make_model(K=3), make_batch()
    scorer = ExpertScorer(model)
    expected = scorer.scores(batch, Method.parse("hMoElp")).e_step().softmax(-1)
    out = em_step(scorer, batch, Method.parse("hMoElp"))
    assert torch.equal(out.responsibilities, expected)
    train(tiny_bin, method="hMoElp", num_experts=2, max_update=2, max_tokens=512,
          log_interval=1, save_dir=tmp_path, **TINY)
    assert "prior_bias" not in read_checkpoint(tmp_path / LAST)
    columns = set(read_history(tmp_path).columns)
    assert not {"estep_temperature", "prior_bias_spread", "model_posterior_mass_0",
                "sinkhorn_residual", "sinkhorn_iterations"} & columns


# --------------------------------------------------------------------------- training


def _train_log(save_dir: Path) -> list[tuple]:
    rows = read_history(save_dir)
    rows = rows[rows.kind == "train"]
    return list(zip(rows["update"], rows.loss, rows.nll, rows.grad_norm, rows.estep_temperature,
                    rows.prior_bias_spread, rows.model_posterior_mass_0, strict=True))


@pytest.mark.usefixtures("one_thread")
def test_resume_with_the_remedies_is_exact(tiny_bin, tmp_path):
    """N updates in one go == N/2, stop, restart: the prior bias comes back from the checkpoint
    and the temperature from the update number (the restart is mid-annealing)."""
    options = dict(TINY, method="hMoElp", num_experts=3, dropout=0.1, max_tokens=1024,
                   warmup_updates=2, lr=3e-3, log_interval=1, seed=5, **REMEDIES)
    full = train(tiny_bin, max_update=8, save_dir=tmp_path / "full", **options)
    train(tiny_bin, max_update=4, save_dir=tmp_path / "split", **options)
    resumed = train(tiny_bin, max_update=8, save_dir=tmp_path / "split", **options)

    log = _train_log(tmp_path / "full")
    assert log == _train_log(tmp_path / "split") and len(log) == 8
    assert [row[4] for row in log] == [3.0, 3 - 2 / 6, 3 - 4 / 6, 2.0, 3 - 8 / 6, 3 - 10 / 6,
                                       1.0, 1.0]
    last = [read_checkpoint(tmp_path / d / LAST) for d in ("full", "split")]
    assert torch.equal(last[0]["prior_bias"], last[1]["prior_bias"])
    assert last[0]["prior_bias"].abs().sum() > 0  # it moved
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert full.valid.loss == resumed.valid.loss


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_checkpoint_without_a_prior_bias_resumes_with_one(tmp_path):
    """A run written before --prior-bias-rate (tests/fixtures/run_v1) resumes with it: the bias
    starts at zero and is saved from then on."""
    shutil.copytree(OLD_RUN, tmp_path / "run_v1")
    save_dir = tmp_path / "run_v1" / "run"
    assert "prior_bias" not in read_checkpoint(save_dir / LAST)
    train(str(tmp_path / "run_v1" / "data-bin"), arch="tiny", method="hMoElp", num_experts=2,
          max_update=6, decoder_layers=1, tokens_per_sample=32, max_tokens=256,
          warmup_updates=2, lr=3e-3, decoder_embed_dim=32, decoder_ffn_embed_dim=64,
          decoder_attention_heads=2, mean_pool_gating_network=True,
          mean_pool_gating_network_encoder_dim=16, dropout=0.0, save_dir=str(save_dir),
          device="cpu", progress_bar=False, log_interval=1, prior_bias_rate=0.5)
    bias = read_checkpoint(save_dir / LAST)["prior_bias"]
    assert bias.shape == (2,)
    assert set((bias / 0.5).tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}  # two steps from zero
    lines = [json.loads(line) for line in (save_dir / "train_log.jsonl").read_text().splitlines()]
    spreads = {r["update"]: r["prior_bias_spread"] for r in lines if "prior_bias_spread" in r}
    assert list(spreads) == [5, 6] and max(spreads.values()) > 0  # it moved


@pytest.mark.slow
def test_training_hard_em_with_balance_trains_the_capped_choice(tiny_bin, tmp_path, monkeypatch):
    """Through the trainer: hard EM's responsibilities are the one-hot capped choice, each
    expert at most ceil(B / K) chunks of a micro-batch."""
    from moelab.train import update

    seen = []
    real = update.em_step

    def spy(scorer, batch, method, **kwargs):
        out = real(scorer, batch, method, **kwargs)
        seen.append(out.responsibilities.detach().clone())
        return out

    monkeypatch.setattr(update, "em_step", spy)
    train(tiny_bin, method="hMoEup", num_experts=3, max_update=2, balance="sinkhorn",
          save_dir=tmp_path, **TINY)
    assert seen
    for r in seen:
        B, K = r.shape
        assert torch.equal(r, torch.nn.functional.one_hot(r.argmax(1), K).to(r.dtype))
        assert torch.bincount(r.argmax(1), minlength=K).max() <= -(-B // K)


@pytest.mark.slow
def test_with_a_remedy_the_log_shows_the_models_own_posterior_beside_the_reshaped_one(
        tiny_bin, tmp_path, monkeypatch):
    """posterior_mass is what the M-step trained on, which Sinkhorn makes balanced by
    construction; model_posterior_mass is softmax(l) itself, so a collapse in the model's own
    beliefs stays visible."""
    from moelab.train import update

    seen = []
    real = update.em_step

    def spy(scorer, batch, method, **kwargs):
        out = real(scorer, batch, method, **kwargs)
        seen.append((out.posterior.mean(0), out.responsibilities.mean(0)))
        return out

    monkeypatch.setattr(update, "em_step", spy)
    train(tiny_bin, method="sMoEup", num_experts=3, max_update=3, balance="sinkhorn",
          log_interval=1, save_dir=tmp_path, **TINY)
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert len(lines) == len(seen) == 3  # one micro-batch per update
    for line, (posterior, trained_on) in zip(lines, seen, strict=True):
        assert line["model_posterior_mass"] == pytest.approx(posterior.tolist(), abs=1e-6)
        assert line["posterior_mass"] == pytest.approx(trained_on.tolist(), abs=1e-6)
        assert line["model_posterior_mass"] != pytest.approx(line["posterior_mass"], abs=1e-3)
        # how balanced the plan it trained on is: within the tolerance, or the cap was hit
        assert line["sinkhorn_iterations"] > 0
        assert (line["sinkhorn_residual"] < SINKHORN_TOLERANCE
                or line["sinkhorn_iterations"] == SINKHORN_MAX_ITERATIONS)
        assert line["posterior_mass"] == pytest.approx(
            [1 / 3] * 3, rel=max(line["sinkhorn_residual"], 1e-6) + 1e-6)
