"""Validation during training: the objective on the valid split, and each document's
posterior read as eval-lm reads it (moelab.clustering)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from moelab.clustering import agreement, document_posterior, posterior_confidence
from moelab.data import TrainBatches
from moelab.model import MixtureLM
from moelab.train import faults
from moelab.train.distributed import DistInfo, NamedSums, all_reduce_sum
from moelab.train.meter import perplexity
from moelab.train.method import Method
from moelab.train.objectives import em_objective


@dataclass
class ValidSums(NamedSums):
    """The valid split's sums, all-reduced as one tensor (NamedSums)."""

    loss: torch.Tensor  # the objective, summed over target tokens
    nll: torch.Tensor
    tokens: torch.Tensor  # target tokens


@dataclass
class ValidResult:
    loss: float  # objective per target token (marginal NLL for soft EM), nats
    nll: float  # -log p(x | z*) per token (hard) / marginal (soft)
    ppl: float  # exp(loss)
    num_tokens: int
    posterior: np.ndarray  # (documents, K) p(z | whole document), prior at the document start
    domain_ids: np.ndarray  # (documents,)
    nmi: float | None  # argmax posterior vs domain labels; None with fewer than 2 domains
    # how sure that clustering is (moelab.clustering.posterior_confidence): read beside the NMI
    confidence: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def validate(model: MixtureLM, batches: TrainBatches, dist: DistInfo,
             method: Method) -> ValidResult:
    """Objective per token on the valid split, and each document's posterior over experts.

    Eval mode, no grad; the objective is training's (em_objective), on all experts' scores, with
    the posterior softmax(l) as the E-step would take it. The documents' scores (log p(x | z)
    summed over their chunks) and the prior at a document's start go through moelab.clustering,
    as eval-lm's do, so the posterior, NMI and confidence logged here are eval-lm's at context
    window 0. Ranks take every world_size-th batch and the sums are all-reduced, so every rank
    returns the same result.
    """
    was_training = model.training
    model.eval()
    K, device, ds = model.num_experts, dist.device, batches.ds
    doc_ll = torch.zeros(len(ds), K, dtype=torch.float64, device=device)  # sum_chunks log p(x|z)
    sums = ValidSums.zeros(device=device)
    for n, position in enumerate(range(dist.rank, batches.batches_per_epoch, dist.world_size)):
        if n == 1:
            faults.hit("valid")  # testing hook: a kill in the middle of validation
        batch = batches.batch(1, position).to(device)
        # float32 on every device, as eval-lm scores: checkpoint_best is chosen on that number
        ll = model.expert_log_likelihoods(batch.tokens, batch.lengths)  # (B, K)
        prior = model.log_prior(batch.context, batch.context_lengths)  # (B, K)
        loss, nll = em_objective(prior, ll, method, (prior + ll).softmax(-1))
        sums.loss += loss.double()
        sums.nll += nll.double()
        sums.tokens += batch.lengths.sum().double()
        doc_ll.index_add_(0, batch.doc_ids, ll.double())
    total = ValidSums.from_tensor(all_reduce_sum(sums.tensor, dist).cpu())
    all_reduce_sum(doc_ll, dist)
    model.train(was_training)
    tokens = np.diff(np.asarray(ds.offsets, dtype=np.int64))
    domain_ids = np.asarray(ds.domain_ids, dtype=np.int64)
    ll = doc_ll.cpu().numpy()  # (D, K)
    _, log_posterior = document_posterior(ll, model.start_log_prior().numpy())
    winner = log_posterior.argmax(1)
    labelled = list(ds.domains) != ["unknown"] and len(np.unique(domain_ids)) > 1
    nmi = agreement(domain_ids, winner)["nmi"] if labelled else None  # no two known domains
    confidence = posterior_confidence(ll, log_posterior, tokens)
    loss = float(total.loss / total.tokens)
    return ValidResult(loss=loss, nll=float(total.nll / total.tokens), ppl=perplexity(loss),
                       num_tokens=int(total.tokens), posterior=np.exp(log_posterior),
                       domain_ids=domain_ids, nmi=nmi, confidence=confidence)
