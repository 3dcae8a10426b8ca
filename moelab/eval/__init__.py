"""Evaluation of trained mixtures: perplexity per method, the posterior over experts and its
clustering, routed inference, expert profiles and the attribution of samples to domains
(docs/design.md section 3).

- `lm`: `moelab eval-lm`: every document scored by every expert with fairseq-eval-lm's sliding
  windows (`windows`), under a latent and a prior (`latents`), fully or routed (`routing`).
- `cache`: `evaluate_run`, a trained run evaluated on one split, scores cached beside it.
- `profiles`: each expert's words, documents and domains.
- `attribution`: which domain each expert's samples read as.
"""

from moelab.eval.cache import evaluate_run
from moelab.eval.lm import EvalConfig, EvalResult, evaluate, summarize

__all__ = ["EvalConfig", "EvalResult", "evaluate", "evaluate_run", "summarize"]
