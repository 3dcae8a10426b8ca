"""Sampling, greedy decoding and beam search per expert: `moelab interactive` and its Python API.

An expert's continuation is the model's continuation of `[<expert_z>] + prompt`
(docs/design.md section 8). Functions are pure and keyword-only; settings live in one
GenerationConfig.

The model sees at most max_seq_len positions. A prompt longer than that keeps its end (with a
PromptTruncatedWarning). When generation fills the context, the window slides: it restarts from
`[<expert_z>]` + the last max_seq_len // 2 tokens (one re-prefill every max_seq_len // 2 tokens,
instead of one full forward per token); the cached and uncached paths slide identically, so they
produce the same tokens.

Routed generation (`expert="topk:K'"`) samples from the mixture of the K' experts with the
highest posterior given the prompt, each weighted by its posterior; every generated token
updates the weights as Bayes does (ExpertMixture).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moelab.data.tokenizer import EOS_ID, Tokenizer
from moelab.eval.windows import window_log_likelihoods
from moelab.model import KVCache, MixtureLM


class PromptTruncatedWarning(UserWarning):
    """The prompt was longer than the model's context; only its end was kept."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 200  # --max-len-b: new tokens at most (eos stops earlier)
    sampling: bool = False  # --sampling; otherwise greedy (beam 1) or beam search
    temperature: float = 1.0  # divides the logits before sampling
    top_p: float = 1.0  # --sampling-topp: nucleus mass; 1 (or fairseq's -1) keeps everything
    beam: int = 1  # --beam: beam width without --sampling
    min_len: int = 0  # --min-len: eos is not allowed before this many new tokens
    seed: int | None = 1  # --seed (fairseq's default 1): the same samples every run; None: unseeded
    use_cache: bool = True  # KV cache (off only to measure or to check it)

    def __post_init__(self) -> None:
        if self.top_p == -1:  # fairseq's "off"
            self.top_p = 1.0
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--sampling-topp must be in (0, 1] (or -1 for off), got {self.top_p}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}; for greedy "
                             "decoding drop --sampling")
        if self.max_new_tokens < 0 or self.min_len < 0:
            raise ValueError("--max-len-b and --min-len must be >= 0")
        if self.beam < 1:
            raise ValueError(f"--beam must be >= 1, got {self.beam}")
        if self.beam > 1 and self.sampling:
            raise ValueError(f"--beam {self.beam} with --sampling: moelab samples one "
                             "continuation at a time; use --beam 1 --sampling to sample, or "
                             f"drop --sampling for beam search with --beam {self.beam}")


# ----------------------------------------------------------------------------- one step


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample token ids (...,) from logits (..., V) with temperature and nucleus (top-p).

    The nucleus is the smallest set of most probable tokens whose mass reaches top_p: a token
    is kept when the mass of the tokens sorted before it is still below top_p.
    """
    probs = F.softmax(logits.float() / temperature, dim=-1)  # (..., V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass ahead of each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V); multinomial renormalizes
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


class _Rows:
    """Sequences being extended: feeds `[<expert>] + window` to the model, with or without cache.

    `tokens` keeps every token (prompt + new); the model sees tokens[start:]. A cache holds the
    keys/values of [<expert>] + tokens[start : start + fed].
    """

    def __init__(self, model: MixtureLM, experts: torch.Tensor, prompt: list[int],
                 use_cache: bool):
        self.model = model
        self.device = next(model.parameters()).device
        self.expert_ids = (model.config.vocab_size + experts).to(self.device)[:, None]  # (B, 1)
        self.tokens = torch.tensor([prompt] * len(experts), dtype=torch.long,
                                   device=self.device).view(len(experts), len(prompt))  # (B, n)
        self.use_cache = use_cache
        self.start, self.fed = 0, 0
        self.cache: KVCache | None = None

    @torch.no_grad()
    def next_logits(self) -> torch.Tensor:
        """Logits for the next token of every row, float32 (B, V+K)."""
        n, limit = self.tokens.shape[1], self.model.config.max_seq_len
        if 1 + n - self.start > limit:  # context full: slide, and rebuild the cache
            self.start, self.cache = n - limit // 2, None
        was_training = self.model.training
        if was_training:  # dropout would randomize the logits (toggle only when needed: it
            self.model.eval()  # walks every module, a cost per generated token)
        try:
            if not self.use_cache:
                inputs = torch.cat([self.expert_ids, self.tokens[:, self.start :]], dim=1)
                return self.model.next_token_logits(inputs).float()  # (B, V)
            if self.cache is None:
                self.cache, self.fed = self.model.new_cache(), 0
                inputs = torch.cat([self.expert_ids, self.tokens[:, self.start :]], dim=1)
            else:
                inputs = self.tokens[:, self.start + self.fed :]  # only what the cache lacks
            logits = self.model.next_token_logits(inputs, self.cache).float()  # (B, V)
            self.fed = n - self.start
            return logits
        finally:
            if was_training:
                self.model.train()

    def append(self, ids: torch.Tensor) -> None:
        self.tokens = torch.cat([self.tokens, ids.view(-1, 1).to(self.device)], dim=1)

    def reorder(self, rows: torch.Tensor) -> None:
        self.tokens, self.expert_ids = self.tokens[rows], self.expert_ids[rows]
        if self.cache is not None:
            self.cache.reorder(rows)


# ----------------------------------------------------------------------------- prompts, experts


def encode_prompt(model: MixtureLM, tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt; one that does not fit before the first new token keeps its end."""
    ids = tokenizer.encode(prompt)
    room = model.config.max_seq_len - 1  # position 0 is the expert token
    if len(ids) > room:
        warnings.warn(PromptTruncatedWarning(
            f"the prompt is {len(ids)} tokens but the model's context holds {room} after the "
            f"expert token: keeping its last {room} tokens"), stacklevel=3)
        ids = ids[len(ids) - room :] if room > 0 else []
    return ids


def check_expert(model: MixtureLM, expert: int) -> int:
    """The expert index as an int; anything else raises ValueError listing the valid choices."""
    K = model.num_experts
    try:
        k = operator.index(expert)  # ints and numpy/torch integers, not floats or strings
    except TypeError:
        k = None
    if k is None or isinstance(expert, bool) or not 0 <= k < K:
        raise ValueError(f"expert {expert!r} does not exist: this model has K={K} experts; "
                         f"choose one of {', '.join(map(str, range(K)))}, auto or topk:K'")
    return k


@torch.no_grad()
def expert_posterior(model: MixtureLM, tokenizer: Tokenizer, prompt: str) -> torch.Tensor:
    """p(z | prompt) ∝ pi_z p(prompt | z), pi the prior at a document start -> (K,) float64.

    A prompt longer than the context is scored whole, with sliding windows as in evaluation.
    """
    ids = tokenizer.encode(prompt)
    joint = model.start_log_prior()  # (K,)
    if ids:
        T = model.config.max_seq_len
        ll = window_log_likelihoods(
            model, 1, [len(ids)], lambda d, s, e: np.asarray(ids[s:e], dtype=np.int64),
            tokens_per_sample=T, context_window=T // 2, max_sentences=8,
            pad_id=model.config.pad_id)  # (1, K)
        joint = joint + ll[0]
    return torch.softmax(joint, dim=0)  # (K,)


def _resolve_expert(model: MixtureLM, tokenizer: Tokenizer, prompt: str, expert) -> int:
    if expert == "auto":
        return int(expert_posterior(model, tokenizer, prompt).argmax())
    return check_expert(model, expert)


TOPK = "topk:"  # expert="topk:K'": the mixture of the K' experts of highest posterior


def routed_top_k(model: MixtureLM, expert) -> int | None:
    """K' of `expert="topk:K'"`, checked against the model's K; None for any other choice."""
    if not (isinstance(expert, str) and expert.startswith(TOPK)):
        return None
    K, value = model.num_experts, expert[len(TOPK):]
    k = int(value) if value.isdigit() else 0
    if not 1 <= k <= K:
        raise ValueError(f"expert {expert!r}: K' in topk:K' must be a whole number from 1 to "
                         f"K={K} (topk:{K} is the full mixture)")
    return k


# ----------------------------------------------------------------------------- routed mixture


class ExpertMixture:
    """A few experts continuing one prompt together, mixed by their posterior.

    p(next | prefix) = sum_{z in S} w_z p_z(next | prefix) over the chosen experts S, where w
    is the posterior over S given the prompt (renormalised over S) and, after each appended
    token x, w_z ∝ w_z p_z(x | prefix): the posterior given the prompt and everything generated
    since. With S all K experts this is the model's own predictive distribution. The experts
    run as one batch of |S| rows (with a KV cache unless use_cache is False).
    """

    def __init__(self, model: MixtureLM, prompt_ids: list[int], experts: Sequence[int],
                 log_weights: torch.Tensor, *, use_cache: bool = True):
        self.experts = [check_expert(model, k) for k in experts]
        if len(set(self.experts)) != len(self.experts) or len(log_weights) != len(experts):
            raise ValueError("give each expert once, with one log-weight each")
        self.rows = _Rows(model, torch.tensor(self.experts), prompt_ids, use_cache)
        log_weights = torch.as_tensor(log_weights, dtype=torch.float64).cpu()
        self.log_weights = log_weights - torch.logsumexp(log_weights, 0)  # (|S|,) normalised
        self._expert_log_probs: torch.Tensor | None = None  # (|S|, V) of the next token

    @property
    def weights(self) -> torch.Tensor:
        """w_z over the chosen experts, in the order of `experts` (float64, sums to 1)."""
        return self.log_weights.exp()

    def next_log_probs(self) -> torch.Tensor:
        """log p(next | prefix) of the mixture over the vocabulary, float32 (V,)."""
        logits = self.rows.next_logits()  # (|S|, V)
        self._expert_log_probs = F.log_softmax(logits, dim=-1)  # (|S|, V)
        w = self.log_weights.to(logits.device, torch.float32)[:, None]  # (|S|, 1)
        return torch.logsumexp(w + self._expert_log_probs, dim=0)  # (V,)

    def append(self, token: int) -> None:
        """Extend every expert's text by `token` and update the weights by its likelihood."""
        if self._expert_log_probs is None:
            self.next_log_probs()
        assert self._expert_log_probs is not None
        likelihood = self._expert_log_probs[:, int(token)].double().cpu()  # (|S|,)
        joint = self.log_weights + likelihood
        self.log_weights = joint - torch.logsumexp(joint, 0)
        self._expert_log_probs = None
        self.rows.append(torch.full((len(self.experts),), int(token)))  # every row


def top_experts(posterior: torch.Tensor, top_k: int) -> list[int]:
    """The `top_k` experts of highest posterior, best first (ties: the lower index first)."""
    return sorted(range(len(posterior)), key=lambda k: (-float(posterior[k]), k))[:top_k]


def route(model: MixtureLM, tokenizer: Tokenizer, prompt: str, top_k: int, *,
          use_cache: bool = True) -> ExpertMixture:
    """The mixture of the `top_k` experts of highest posterior given the prompt (top_experts),
    weighted by that posterior renormalised over them."""
    posterior = expert_posterior(model, tokenizer, prompt)  # (K,)
    order = top_experts(posterior, top_k)
    return ExpertMixture(model, encode_prompt(model, tokenizer, prompt), order,
                         posterior[order].log(), use_cache=use_cache)


# ----------------------------------------------------------------------------- decoding


def _new_tokens(model: MixtureLM, prompt_ids: list[int], *, expert: int,
                config: GenerationConfig, generator: torch.Generator | None
                ) -> Iterator[int]:
    """New token ids one at a time (sampling or greedy), stopping at eos (not yielded)."""
    rows = _Rows(model, torch.tensor([expert]), prompt_ids, config.use_cache)
    return _decode(rows.next_logits, rows.append, config=config, generator=generator)


def _decode(next_logits: Callable[[], torch.Tensor], append: Callable[[torch.Tensor], None], *,
            config: GenerationConfig, generator: torch.Generator | None) -> Iterator[int]:
    """Sample (or take the argmax of) next_logits() (1, V), append it, until eos (not yielded)
    or max_new_tokens. Logits may be log-probabilities: softmax gives the same distribution."""
    for step in range(config.max_new_tokens):
        # the model's distribution: expert tokens, unk, bos and pad are not in it
        logits = next_logits()  # (1, V)
        if step < config.min_len:
            logits[:, EOS_ID] = -math.inf
        if config.sampling:
            token = sample_next(logits, temperature=config.temperature, top_p=config.top_p,
                                generator=generator)
        else:
            token = logits.argmax(dim=-1)
        if int(token) == EOS_ID:
            return
        yield int(token)
        append(token)


def mixture_tokens(mixture: ExpertMixture, *, config: GenerationConfig,
                   generator: torch.Generator | None = None) -> Iterator[int]:
    """New token ids sampled (or greedy) from a routed mixture, its weights updated as it goes."""
    return _decode(lambda: mixture.next_log_probs()[None].clone(),
                   lambda token: mixture.append(int(token)), config=config, generator=generator)


def _generator(model: MixtureLM, config: GenerationConfig, generator: torch.Generator | None
               ) -> torch.Generator | None:
    if generator is not None or config.seed is None:
        return generator
    return torch.Generator(next(model.parameters()).device).manual_seed(config.seed)


def generate(model: MixtureLM, tokenizer: Tokenizer, prompt: str, *, expert: int | str = 0,
             config: GenerationConfig | None = None,
             generator: torch.Generator | None = None) -> str:
    """The continuation (text after the prompt) from one expert, "auto" (highest posterior) or
    "topk:K'" (the posterior-weighted mixture of the K' experts of highest posterior, the
    weights updated by every generated token: ExpertMixture).

    Beam search when config.beam > 1; sampling with config.sampling; greedy otherwise.
    `generator` (else one seeded from config.seed) drives sampling.
    """
    return "".join(stream(model, tokenizer, prompt, expert=expert, config=config,
                          generator=generator))


def stream(model: MixtureLM, tokenizer: Tokenizer, prompt: str, *, expert: int | str = 0,
           config: GenerationConfig | None = None,
           generator: torch.Generator | None = None) -> Iterator[str]:
    """Like `generate`, yielding text pieces as tokens arrive; their concatenation is the text.

    A byte-fallback character spans several tokens: text is held back until the pending tokens
    decode cleanly (no trailing replacement character), so no piece shows a half character.
    """
    config = config or GenerationConfig()
    generator = _generator(model, config, generator)
    top_k = routed_top_k(model, expert)
    if top_k is not None:
        if config.beam > 1 and not config.sampling:
            raise ValueError(f"beam search follows one expert: expert {expert!r} mixes "
                             f"{top_k}; use --beam 1 (greedy or --sampling) with topk, or an "
                             "expert index with --beam")
        tokens = mixture_tokens(route(model, tokenizer, prompt, top_k,
                                      use_cache=config.use_cache),
                                config=config, generator=generator)
    else:
        expert = _resolve_expert(model, tokenizer, prompt, expert)
        if config.beam > 1 and not config.sampling:
            yield beam_search(model, tokenizer, prompt, expert=expert, config=config)
            return
        tokens = _new_tokens(model, encode_prompt(model, tokenizer, prompt), expert=expert,
                             config=config, generator=generator)
    # Tokens not yet shown. SentencePiece decodes piece by piece, so once a prefix decodes
    # cleanly the rest decodes on its own: only the pending suffix is decoded each step, which
    # keeps streaming linear in the length.
    pending: list[int] = []
    for token in tokens:
        pending.append(token)
        text = tokenizer.decode(pending)
        if text and not text.endswith("\ufffd"):  # a byte-fallback character is complete
            yield text
            pending = []
    if pending:  # the last tokens end mid-character: show them as the decoder does
        text = tokenizer.decode(pending)
        if text:
            yield text


@torch.no_grad()
def beam_search(model: MixtureLM, tokenizer: Tokenizer, prompt: str, *, expert: int = 0,
                config: GenerationConfig | None = None) -> str:
    """The highest-scoring continuation of `config.beam` beams (fairseq-style, length-normalized).

    At each step the 2*beam best extensions are taken; an eos among the best `beam` finishes a
    hypothesis (score / its length), the first `beam` others live on. Beam 1 is greedy decoding.
    As in fairseq (lenpen 1): a score is the sum of log p with the eos, over the new tokens plus
    the eos; after max_new_tokens the live beams end with a forced eos, scored the same way.
    """
    config = config or GenerationConfig()
    expert = check_expert(model, expert)
    beam = config.beam
    prompt_ids = encode_prompt(model, tokenizer, prompt)
    rows = _Rows(model, torch.tensor([expert]), prompt_ids, config.use_cache)
    scores = torch.zeros(1, dtype=torch.float64, device=rows.device)  # (live,)
    finished: list[tuple[float, list[int]]] = []
    n_prompt = len(prompt_ids)
    for step in range(config.max_new_tokens):
        logits = rows.next_logits()  # (live, V)
        if step < config.min_len:
            logits[:, EOS_ID] = -math.inf
        candidates = scores[:, None] + F.log_softmax(logits, dim=-1).double()  # (live, V)
        top, flat = candidates.view(-1).topk(min(2 * beam, candidates.numel()))
        width = candidates.shape[1]
        keep_rows, keep_ids, keep_scores = [], [], []
        for rank, (score, index) in enumerate(zip(top.tolist(), flat.tolist(), strict=True)):
            if score == -math.inf:
                break
            row, token = divmod(index, width)
            if token == EOS_ID:
                if rank < beam:
                    done = rows.tokens[row, n_prompt:].tolist()
                    finished.append((score / (len(done) + 1), done))
                continue
            keep_rows.append(row)
            keep_ids.append(token)
            keep_scores.append(score)
            if len(keep_rows) == beam:
                break
        if len(finished) >= beam or not keep_rows:
            break
        rows.reorder(torch.tensor(keep_rows, device=rows.device))
        rows.append(torch.tensor(keep_ids))
        scores = torch.tensor(keep_scores, dtype=torch.float64, device=rows.device)
    else:  # max_new_tokens reached: as fairseq, the live beams end with a forced eos, which
        # costs its log-probability and counts in the length like any finished hypothesis's
        eos = F.log_softmax(rows.next_logits(), dim=-1)[:, EOS_ID].double()  # (live,)
        for row in range(rows.tokens.shape[0]):
            done = rows.tokens[row, n_prompt:].tolist()
            finished.append((float(scores[row] + eos[row]) / (len(done) + 1), done))
    if not finished:
        return ""
    best = max(finished, key=lambda f: f[0])[1]
    return tokenizer.decode(best)


def expert_samples(model, tokenizer, *, per_expert: int, max_new_tokens: int, seed: int = 1,
                   top_p: float = 0.9) -> dict[int, list[str]]:
    """expert -> `per_expert` nucleus samples continuing the empty prompt. One generator seeded
    with `seed` per expert serves its samples in turn, so the first sample of each expert is the
    one a single `generate(..., config=GenerationConfig(seed=seed))` call gives."""
    settings = GenerationConfig(max_new_tokens=max_new_tokens, sampling=True, top_p=top_p,
                                seed=seed)
    device = next(model.parameters()).device
    samples = {}
    for k in range(model.num_experts):
        generator = torch.Generator(device).manual_seed(seed)
        samples[k] = [generate(model, tokenizer, "", expert=k, config=settings,
                               generator=generator) for _ in range(per_expert)]
    return samples
