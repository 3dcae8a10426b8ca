"""A trained run evaluated on one split, its per-document scores cached beside its checkpoint.

The cache holds the scores (every expert's log-likelihood of every document, the prior, the
settings and any routed figures) as plain arrays, never pickles; every table is recomputed from
them, so a cached result is the result (docs/design.md section 3).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from moelab.data import BinarizedDataset
from moelab.eval.lm import SETTINGS_KEYS, EvalResult, evaluate, summarize, with_routing
from moelab.eval.routing import Routing, parse_routing, routed_documents
from moelab.train.checkpoint import BEST
from moelab.train.run import Run


def evaluate_run(run: Run, split: str = "valid", *, context_window: int = 0,
                 tokens_per_sample: int | None = None, max_sentences: int = 32,
                 progress: bool = True, cache: bool = True,
                 routing: str | Routing | None = "full", prior: str = "start",
                 latent: str = "document") -> EvalResult:
    """moelab.eval.lm.evaluate on one split (`prior="cached"` estimates the prior on this
    run's valid split); the per-document scores are kept in the save folder
    (`eval_{split}_c{context_window}.npz` for checkpoint_best.pt, the routing, prior and
    latent in the name when they are not the defaults) and reused while they are newer than
    the checkpoint."""
    dataset = run.dataset(split)
    routing = parse_routing(routing)
    file = scores_path(run, split, context_window, tokens_per_sample, routing=routing,
                       prior=prior, latent=latent)
    if cache and _newer(file, run.checkpoint_path):
        return load_scores(file, dataset)
    result = evaluate(run.model, dataset, tokens_per_sample=tokens_per_sample,
                      context_window=context_window, max_sentences=max_sentences,
                      progress=progress, routing=routing, prior=prior, latent=latent,
                      prior_dataset=run.dataset("valid") if prior == "cached" else None)
    if cache and run.checkpoint_path.is_file():
        save_scores(result, dataset, file)
    return result


def scores_path(run: Run, split: str, context_window: int,
                tokens_per_sample: int | None = None, *, routing: Routing | None = None,
                prior: str = "start", latent: str = "document") -> Path:
    """Where an evaluation's scores are cached: every option that changes a number is in
    the name, so a routed, cached-prior or chunk-latent result never reads as the default
    one (whose name stays as it was)."""
    which = "" if run.checkpoint_path.name == BEST else f"{run.checkpoint_path.stem}_"
    window = "" if tokens_per_sample is None else f"_t{tokens_per_sample}"
    options = "".join([
        "" if routing is None else "_r" + str(routing).replace(":", "").replace(",", "-"),
        "" if prior == "start" else f"_p{prior}",
        "" if latent == "document" else f"_l{latent}"])
    return run.save_dir / f"eval_{which}{split}_c{context_window}{window}{options}.npz"


def _newer(path: Path, than: Path) -> bool:
    return path.is_file() and than.is_file() and path.stat().st_mtime >= than.stat().st_mtime


def save_scores(result: EvalResult, dataset: BinarizedDataset, path: Path) -> None:
    """The per-document scores behind an EvalResult, as plain arrays (no pickle); its settings,
    notes and routed figures too, so that the result it rebuilds says how it was made."""
    experts = [c for c in result.documents.columns if c.startswith("expert_")]
    window = [int(result.summary["tokens_per_sample"]), int(result.summary["context_window"])]
    meta = {"settings": {k: _plain(result.summary[k]) for k in SETTINGS_KEYS
                         if k in result.summary},
            "notes": result.notes}
    arrays = {}
    if result.summary.get("latent", "document") != "document":  # its own mixture and posterior
        arrays["mixture"] = result.documents["mixture"].to_numpy()
        with np.errstate(divide="ignore"):
            arrays["log_posterior"] = np.log(result.posteriors.to_numpy())
    if result.routed_documents is not None:
        frame = result.routed_documents
        choices = [c for c in frame.columns if c.startswith("choice_")]
        arrays.update(routed_docs=frame.index.to_numpy(), routed_tokens=frame["tokens"].to_numpy(),
                      routed_mixture=frame["mixture"].to_numpy(),
                      routed_ll=frame["routed"].to_numpy(),
                      routed_chosen=frame[choices].to_numpy(),
                      routed_winner=frame["winner"].to_numpy())
        meta["routing"] = {k: _plain(result.summary[k]) for k in ROUTING_KEYS}
    tmp = path.with_suffix(f".{time.time_ns()}.tmp.npz")
    np.savez(tmp, ll=result.documents[experts].to_numpy(), log_prior=result.log_prior,
             tokens=result.documents["tokens"].to_numpy(),
             domain_ids=np.asarray(dataset.domain_ids, dtype=np.int64), window=np.asarray(window),
             meta=np.asarray(json.dumps(meta)), **arrays)
    tmp.replace(path)


# what the routed summary holds beyond the routed documents' table (moelab.eval.lm)
ROUTING_KEYS = ("short_documents", "prefix_tokens", "top_k", "forwards_per_token_full",
                "forwards_per_token_routed", "seconds_routed", "tokens_per_second_full",
                "tokens_per_second_routed")


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def load_scores(path: Path, dataset: BinarizedDataset) -> EvalResult:
    """The EvalResult of save_scores' arrays: every table is recomputed from them."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        result = summarize(z["ll"], z["log_prior"], z["tokens"], z["domain_ids"], dataset.domains,
                           tokens_per_sample=int(z["window"][0]),
                           context_window=int(z["window"][1]),
                           mixture=z["mixture"] if "mixture" in z.files else None,
                           log_posterior=z["log_posterior"] if "log_posterior" in z.files
                           else None, settings=meta.get("settings"))
        if "routed_docs" in z.files:
            docs = z["routed_docs"]
            frame = routed_documents(
                docs=docs, domains=result.documents["domain"].to_numpy()[docs],
                tokens_after=z["routed_tokens"],
                mixture=z["routed_mixture"], routed=z["routed_ll"], chosen=z["routed_chosen"],
                winner=z["routed_winner"])
            result = with_routing(result, frame, meta["routing"], domains=list(dataset.domains))
    if "notes" in meta:
        result.notes = meta["notes"]
    return result
