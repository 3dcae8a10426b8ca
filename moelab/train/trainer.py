"""The training loop, as small functions read top to bottom (nanoGPT / torchtitan style).

`fit` builds the data, model and optimizer, resumes from a checkpoint when the save dir has one,
then repeats: take `update_freq` batches, one EM update, log, validate, save. It knows nothing
about notebooks or the command line: callers pass `on_log` / `on_eval` callbacks and get a
TrainResult back. Only rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from moelab.data import Batch, BinarizedDataset, TrainBatches, collate
from moelab.model import MixtureLM, ModelConfig
from moelab.train import checkpoint as ckpt
from moelab.train.config import RunConfig, model_config
from moelab.train.distributed import DistInfo, all_reduce_sum, gather_objects
from moelab.train.history import append_record, read_history, truncate_history
from moelab.train.objectives import em_loss, method_flags
from moelab.train.schedule import learning_rate

Callback = Callable[[dict], None]


@dataclass
class TrainState:
    """Where training stands; all of it goes into the checkpoint."""

    num_updates: int = 0
    epoch: int = 1  # the epoch of the next batch (1-based, as fairseq)
    batch_in_epoch: int = 0  # index of the next batch within that epoch
    best_valid_loss: float = math.inf
    wall_time: float = 0.0  # seconds spent training, summed over resumed runs


@dataclass
class ValidResult:
    loss: float  # objective per target token (marginal NLL for soft EM), nats
    nll: float  # -log p(x | z*) per token (hard) / marginal (soft)
    ppl: float  # exp(loss)
    num_tokens: int
    posterior: np.ndarray  # (documents, K) p(z | whole document), prior at the document start
    domain_ids: np.ndarray  # (documents,)
    nmi: float | None  # argmax posterior vs domain labels; None with fewer than 2 domains


@dataclass
class TrainResult:
    model: MixtureLM
    model_config: ModelConfig
    config: RunConfig
    num_updates: int
    valid: ValidResult | None
    save_dir: Path
    history: pd.DataFrame | None = field(default=None, repr=False)  # rank 0 only


# --------------------------------------------------------------------------- the loop


def fit(config: RunConfig, dist: DistInfo, *, on_log: Callback | None = None,
        on_eval: Callback | None = None) -> TrainResult:
    started = time.perf_counter()
    set_seed(config.train.seed)
    say = _printer(dist)
    hard, uniform_prior = method_flags(config.model.method)
    if uniform_prior and config.model.mean_pool_gating_network:
        say(f"note: --mean-pool-gating-network is unused with --method {config.model.method}: "
            "the uniform prior p(z) = 1/K needs no gating network, so none is built")
    train_ds = BinarizedDataset(config.data.data, "train")
    valid_set = valid_batches(BinarizedDataset(config.data.data, "valid"), config)
    mconf = model_config(config.model, vocab_size=train_ds.vocab_size, pad_id=train_ds.pad_id,
                         tokens_per_sample=config.data.tokens_per_sample)
    model = MixtureLM(mconf).to(dist.device)
    optimizer = build_optimizer(model, config, dist.device)
    state = TrainState()
    save_dir = Path(config.train.save_dir)
    restore = find_restore_file(config)
    if restore is not None:
        state = restore_checkpoint(restore, model, optimizer, mconf, train_ds, dist)
        say(f"resumed from {restore} at update {state.num_updates} (epoch {state.epoch})")
    if dist.is_main:
        truncate_history(save_dir, state.num_updates)

    step_module = wrap_for_training(model, dist, hard=hard, uniform_prior=uniform_prior)
    batches = train_batches(train_ds, config, dist)
    autocast = autocast_context(dist.device)
    meter = Meter(mconf.num_experts, dist.device)
    progress = tqdm(total=config.train.max_update or None, initial=state.num_updates,
                    unit="update", disable=not (dist.is_main and config.train.progress_bar),
                    dynamic_ncols=True)
    updates_at_start = state.num_updates

    while not finished(state, config):
        micro_batches = next_batches(batches, state, config)
        if not micro_batches:
            break
        lr = set_learning_rate(optimizer, config, state.num_updates)
        stats = train_step(step_module, micro_batches, optimizer, dist=dist,
                           clip_norm=config.optim.clip_norm, autocast=autocast)
        state.num_updates += 1
        meter.add(stats)
        progress.update(1)
        if state.num_updates % config.train.log_interval == 0:
            record = log_train(meter, state, lr, dist, save_dir, started)
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}")
            if on_log is not None and dist.is_main:
                on_log(record)
        if finished(state, config):
            break  # the final validation and save follow the loop
        if _due(state, config.train.validate_interval_updates):
            evaluate_and_save(model, optimizer, state, config, mconf, valid_set, train_ds, dist,
                              hard=hard, on_eval=on_eval, started=started)
        elif _due(state, config.train.save_interval_updates):
            save(model, optimizer, state, config, mconf, train_ds, dist, started, ckpt.LAST)
    progress.close()

    if state.num_updates > updates_at_start or restore is None:
        result = evaluate_and_save(model, optimizer, state, config, mconf, valid_set, train_ds,
                                   dist, hard=hard, on_eval=on_eval, started=started)
    else:  # the checkpoint was already finished: report, but write nothing new
        result = validate(model, valid_set, dist, hard=hard)
    model.eval()
    history = read_history(save_dir) if dist.is_main else None
    return TrainResult(model=model, model_config=mconf, config=config,
                       num_updates=state.num_updates, valid=result, save_dir=save_dir,
                       history=history)


def _due(state: TrainState, interval: int) -> bool:
    return interval > 0 and state.num_updates % interval == 0


def finished(state: TrainState, config: RunConfig) -> bool:
    t = config.train
    return ((t.max_update > 0 and state.num_updates >= t.max_update)
            or (t.max_epoch > 0 and state.epoch > t.max_epoch))


# --------------------------------------------------------------------------- setup


def set_seed(seed: int) -> None:
    """The same seed on every rank: identical initial weights (DDP broadcasts them anyway)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, config: RunConfig, device: torch.device
                    ) -> torch.optim.Adam:
    o = config.optim
    # fused Adam is one kernel for all parameters on CUDA; CPU has no fused kernel here
    return torch.optim.Adam(model.parameters(), lr=o.lr, betas=o.adam_betas, eps=o.adam_eps,
                            weight_decay=o.weight_decay, fused=device.type == "cuda")


def autocast_context(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA (no loss scaling needed); plain fp32 on CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_batches(ds: BinarizedDataset, config: RunConfig, dist: DistInfo) -> TrainBatches:
    d = config.data
    return TrainBatches(ds, tokens_per_sample=d.tokens_per_sample, max_tokens=_max_tokens(config),
                        seed=config.train.seed, max_sentences=d.max_sentences,
                        rank=dist.rank, world_size=dist.world_size)


def valid_batches(ds: BinarizedDataset, config: RunConfig) -> TrainBatches:
    """All valid chunks in a fixed order; `validate` deals them out to the ranks itself."""
    d = config.data
    return TrainBatches(ds, tokens_per_sample=d.tokens_per_sample, max_tokens=_max_tokens(config),
                        max_sentences=d.max_sentences, shuffle=False)


def _max_tokens(config: RunConfig) -> int:
    d = config.data
    return d.max_tokens if d.max_tokens is not None else d.max_sentences * d.tokens_per_sample


class EMStep(nn.Module):
    """Runs the whole EM step (E-step and M-step) as one forward, so DDP can wrap it.

    The E-step inside em_loss scores all experts under no_grad, so it adds nothing to the graph;
    the M-step's graph is the one DDP's reducer expects, and the gradient all-reduce happens in
    backward as usual. Returns a tuple so DDP finds the output tensors.
    """

    def __init__(self, model: MixtureLM, *, hard: bool, uniform_prior: bool):
        super().__init__()
        self.model = model
        self.hard, self.uniform_prior = hard, uniform_prior

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = em_loss(self.model, batch, hard=self.hard, uniform_prior=self.uniform_prior)
        return out.loss, out.responsibilities, out.nll


def wrap_for_training(model: MixtureLM, dist: DistInfo, *, hard: bool,
                      uniform_prior: bool) -> nn.Module:
    model.train()
    step = EMStep(model, hard=hard, uniform_prior=uniform_prior)
    if not dist.distributed:
        return step
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    # Every parameter gets a gradient each step (a uniform prior builds no gating network), so
    # the reducer needs no unused-parameter search.
    return DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=False)


def find_restore_file(config: RunConfig) -> Path | None:
    """fairseq's rule: --restore-file (default checkpoint_last.pt) is looked up in --save-dir."""
    t = config.train
    given = Path(t.restore_file)
    candidates = [given] if given.is_absolute() else [Path(t.save_dir) / given, given]
    for path in candidates:
        if path.is_file():
            return path
    if t.restore_file != "checkpoint_last.pt":
        raise ckpt.CheckpointError(f"--restore-file {t.restore_file} not found (looked in "
                                   f"{', '.join(str(c) for c in candidates)})")
    return None


# --------------------------------------------------------------------------- one update


def next_batches(batches: TrainBatches, state: TrainState, config: RunConfig) -> list[Batch]:
    """The next `update_freq` batches, advancing the data position (across epoch ends)."""
    out = []
    max_epoch = config.train.max_epoch
    while len(out) < config.train.update_freq and not (max_epoch and state.epoch > max_epoch):
        out.append(next(batches.epoch(state.epoch, start=state.batch_in_epoch)))
        state.batch_in_epoch += 1
        if state.batch_in_epoch >= batches.batches_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    return out


def set_learning_rate(optimizer: torch.optim.Optimizer, config: RunConfig,
                      num_updates: int) -> float:
    lr = learning_rate(config.optim, num_updates)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class StepStats:
    loss: torch.Tensor  # summed over tokens (all micro-batches, this rank)
    nll: torch.Tensor
    num_tokens: int  # this rank's targets
    global_tokens: int  # all ranks' targets in the update
    responsibility_sum: torch.Tensor  # (K,) summed over chunks
    argmax_counts: torch.Tensor  # (K,)
    num_chunks: int
    grad_norm: torch.Tensor  # before clipping


def train_step(step_module: nn.Module, micro_batches: list[Batch], optimizer: torch.optim.Optimizer,
               *, dist: DistInfo, clip_norm: float, autocast) -> StepStats:
    """One optimizer update over `update_freq` micro-batches, normalized as fairseq does.

    Each micro-batch backpropagates its SUMMED loss scaled by 1 / (targets in the whole update,
    over all ranks), so the gradient is that of the mean per-token loss of the update, however it
    is split into micro-batches or ranks. DDP averages over ranks, hence the world_size factor.
    """
    device = dist.device
    tokens = [b.num_tokens for b in micro_batches]  # counted on CPU: no device sync
    global_tokens = int(all_reduce_sum(torch.tensor([sum(tokens)], device=device), dist).item()
                        ) if dist.distributed else sum(tokens)
    scale = dist.world_size / global_tokens
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    r_sum, counts, chunks = None, None, 0
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        last = i == len(micro_batches) - 1
        # gradients are all-reduced once per update: skip DDP's sync on all but the last
        sync = contextlib.nullcontext() if last or not dist.distributed else step_module.no_sync()
        with sync:
            with autocast():
                loss, r, nll = step_module(batch)
            (loss * scale).backward()
        loss_sum += loss.detach().float()
        nll_sum += nll.float()
        r_sum = r.sum(0) if r_sum is None else r_sum + r.sum(0)  # (K,)
        won = torch.bincount(r.argmax(-1), minlength=r.shape[1])  # (K,)
        counts = won if counts is None else counts + won
        chunks += r.shape[0]
    params = [p for p in optimizer.param_groups[0]["params"] if p.grad is not None]
    max_norm = clip_norm if clip_norm > 0 else math.inf  # inf: measure the norm, clip nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return StepStats(loss=loss_sum, nll=nll_sum, num_tokens=sum(tokens),
                     global_tokens=global_tokens, responsibility_sum=r_sum,
                     argmax_counts=counts, num_chunks=chunks, grad_norm=grad_norm.detach())


# --------------------------------------------------------------------------- logging


class Meter:
    """Sums over one log interval, kept on the device so a step never waits for the GPU."""

    def __init__(self, num_experts: int, device: torch.device):
        self.num_experts, self.device = num_experts, device
        self.reset()

    def reset(self) -> None:
        K = self.num_experts
        # loss, nll, tokens, chunks, grad_norm sum, r_sum (K), argmax counts (K)
        self.sums = torch.zeros(5 + 2 * K, dtype=torch.float64, device=self.device)
        self.updates = 0
        self.global_tokens = 0
        self.since = time.perf_counter()

    def add(self, s: StepStats) -> None:
        K = self.num_experts
        self.sums[0] += s.loss.double()
        self.sums[1] += s.nll.double()
        self.sums[2] += s.num_tokens
        self.sums[3] += s.num_chunks
        self.sums[4] += s.grad_norm.double()
        self.sums[5 : 5 + K] += s.responsibility_sum.double()
        self.sums[5 + K :] += s.argmax_counts.double()
        self.updates += 1
        self.global_tokens += s.global_tokens


def log_train(meter: Meter, state: TrainState, lr: float, dist: DistInfo, save_dir: Path,
              started: float) -> dict:
    """Reduce the interval's sums over ranks into one log line (written by rank 0)."""
    K = meter.num_experts
    sums = all_reduce_sum(meter.sums.clone(), dist).cpu()
    grad_norm_sum = float(meter.sums[4])  # identical on every rank after the all-reduce of grads
    loss = float(sums[0] / sums[2])
    if not math.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss} at update {state.num_updates}; lower "
                                 "--lr, raise --warmup-updates or set --clip-norm")
    elapsed = time.perf_counter() - meter.since
    usage = sums[5 + K :] / sums[5 + K :].sum()
    record = {
        "kind": "train", "update": state.num_updates, "epoch": state.epoch,
        "loss": loss, "nll": float(sums[1] / sums[2]), "ppl": _ppl(loss), "lr": lr,
        "grad_norm": grad_norm_sum / meter.updates,
        "tokens_per_s": meter.global_tokens / max(elapsed, 1e-9),
        "posterior_mass": (sums[5 : 5 + K] / sums[3]).tolist(),
        "usage_entropy": _entropy(usage),
        "wall": state.wall_time + time.perf_counter() - started,
    }
    if dist.is_main:
        append_record(save_dir, record)
    meter.reset()
    return record


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _printer(dist: DistInfo) -> Callable[[str], None]:
    def say(message: str) -> None:
        if dist.is_main:
            tqdm.write(f"moelab train: {message}", file=sys.stderr)
    return say


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: MixtureLM, batches: TrainBatches, dist: DistInfo, *,
             hard: bool) -> ValidResult:
    """Objective per token on the valid split, and each document's posterior over experts.

    Eval mode, no grad. A document's posterior sums log p(x | z) over its chunks and adds the
    prior at the document start (empty context). Ranks take every world_size-th batch and the
    sums are all-reduced, so every rank returns the same result.
    """
    was_training = model.training
    model.eval()
    K, device, ds = model.num_experts, dist.device, batches.ds
    doc_ll = torch.zeros(len(ds), K, dtype=torch.float64, device=device)  # sum_chunks log p(x|z)
    doc_prior = torch.zeros(len(ds), K, dtype=torch.float64, device=device)  # log p(z | empty)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, nll, tokens
    autocast = autocast_context(device)
    for index in batches.order(1)[dist.rank :: dist.world_size]:
        chunks = [batches.chunks[i] for i in batches.batches[index]]
        batch = collate(ds, chunks, batches.max_context).to(device)
        with autocast():
            ll = model.expert_log_likelihoods(batch.tokens, batch.lengths).float()  # (B, K)
            prior = model.log_prior(batch.context, batch.context_lengths).float()  # (B, K)
        scores = prior + ll  # (B, K)
        if hard:
            z = scores.argmax(-1, keepdim=True)  # (B, 1)
            loss, nll = -scores.gather(1, z).sum(), -ll.gather(1, z).sum()
        else:
            loss = nll = -torch.logsumexp(scores, dim=-1).sum()
        sums += torch.stack([loss.double(), nll.double(),
                             batch.lengths.sum().double()])
        doc_ll.index_add_(0, batch.doc_ids, ll.double())
        first = batch.context_lengths == 0  # the document's first chunk: prior at its start
        doc_prior[batch.doc_ids[first]] = prior[first].double()
    for t in (sums, doc_ll, doc_prior):
        all_reduce_sum(t, dist)
    model.train(was_training)
    sums = sums.cpu()
    posterior = torch.softmax(doc_prior + doc_ll, dim=-1).cpu().numpy()  # (D, K)
    loss = float(sums[0] / sums[2])
    domain_ids = np.asarray(ds.domain_ids, dtype=np.int64)
    nmi = (normalized_mutual_info(domain_ids, posterior.argmax(1))
           if len(set(domain_ids.tolist())) > 1 else None)
    return ValidResult(loss=loss, nll=float(sums[1] / sums[2]), ppl=_ppl(loss),
                       num_tokens=int(sums[2]), posterior=posterior, domain_ids=domain_ids,
                       nmi=nmi)


def normalized_mutual_info(labels: np.ndarray, clusters: np.ndarray) -> float:
    """NMI with arithmetic-mean normalization (sklearn's default), in a few lines of numpy."""
    _, a = np.unique(labels, return_inverse=True)
    _, b = np.unique(clusters, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = -float((pa * np.log(pa)).sum()), -float((pb * np.log(pb)).sum())
    if ha == 0.0 and hb == 0.0:
        return 1.0
    return max(mi, 0.0) / ((ha + hb) / 2) if ha + hb > 0 else 0.0


def evaluate_and_save(model, optimizer, state, config, mconf, valid, train_ds, dist, *,
                      hard: bool, on_eval: Callback | None, started: float) -> ValidResult:
    """Validate, log a `valid` line, save checkpoint_last (and checkpoint_best if improved)."""
    result = validate(model, valid, dist, hard=hard)
    counts = np.bincount(result.posterior.argmax(1), minlength=mconf.num_experts)
    record = {
        "kind": "valid", "update": state.num_updates, "epoch": state.epoch,
        "loss": result.loss, "nll": result.nll, "ppl": result.ppl,
        "num_tokens": result.num_tokens,
        "posterior_mass": result.posterior.mean(0).tolist(),
        "usage_entropy": _entropy(torch.from_numpy(counts / counts.sum())),
        "nmi": result.nmi,
        "wall": state.wall_time + time.perf_counter() - started,
    }
    improved = result.loss < state.best_valid_loss
    if improved:
        state.best_valid_loss = result.loss
    if dist.is_main:
        append_record(config.train.save_dir, record)
        nmi = "" if result.nmi is None else f" | nmi {result.nmi:.3f}"
        _printer(dist)(f"valid | update {state.num_updates} | loss {result.loss:.4f} | "
                       f"ppl {result.ppl:.2f}{nmi}")
    save(model, optimizer, state, config, mconf, train_ds, dist, started,
         ckpt.LAST, ckpt.BEST if improved else None)
    if on_eval is not None and dist.is_main:
        on_eval(record)
    return result


# --------------------------------------------------------------------------- checkpoints


def save(model, optimizer, state: TrainState, config: RunConfig, mconf: ModelConfig,
         train_ds: BinarizedDataset, dist: DistInfo, started: float, *names: str | None) -> None:
    """Every rank contributes its RNG state (a collective); rank 0 writes the files."""
    rng = gather_objects(ckpt.rng_state(), dist)
    if not dist.is_main:
        return
    checkpoint = {
        "format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"name": config.optim.lr_scheduler, "num_updates": state.num_updates},
        "rng": rng,  # one entry per rank
        "data_position": {"epoch": state.epoch, "batch": state.batch_in_epoch,
                          "world_size": dist.world_size},
        "num_updates": state.num_updates,
        "best_valid_loss": state.best_valid_loss,
        "wall_time": state.wall_time + time.perf_counter() - started,
        "config": config.to_dict(),
        "model_config": dataclasses.asdict(mconf),
        "tokenizer": {"sha256": train_ds.meta.get("tokenizer_sha256"),
                      "vocab_size": train_ds.vocab_size},
    }
    for name in names:
        if name is not None:
            ckpt.save_checkpoint(Path(config.train.save_dir) / name, checkpoint)


def restore_checkpoint(path: Path, model: MixtureLM, optimizer: torch.optim.Optimizer,
                       mconf: ModelConfig, train_ds: BinarizedDataset, dist: DistInfo
                       ) -> TrainState:
    """Load weights, optimizer, RNG and data position so the run continues exactly."""
    checkpoint = ckpt.read_checkpoint(path, map_location=dist.device)
    ckpt.check_compatible(checkpoint, mconf, train_ds.meta.get("tokenizer_sha256"), path)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    rng = checkpoint["rng"]
    position = checkpoint["data_position"]
    if position.get("world_size", 1) != dist.world_size:
        _printer(dist)(f"note: {path} was written by {position.get('world_size')} process(es) "
                       f"and this run has {dist.world_size}: the data order changes from here")
        state = TrainState(epoch=position["epoch"] + (position["batch"] > 0))
    else:
        state = TrainState(epoch=position["epoch"], batch_in_epoch=position["batch"])
    ckpt.set_rng_state(rng[dist.rank] if len(rng) == dist.world_size else rng[0])
    state.num_updates = checkpoint["num_updates"]
    state.best_valid_loss = checkpoint["best_valid_loss"]
    state.wall_time = checkpoint.get("wall_time", 0.0)
    return state
