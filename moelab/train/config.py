"""Training configuration: one dataclass per concern (data, model, optimizer, run).

`moelab train`'s flags are generated from these fields (moelab/cli/train.py): a field
`warmup_updates` is the flag `--warmup-updates` with the same default, so Python and shell callers
share one set of defaults. Field names are unique across the four classes, which lets
`RunConfig.from_kwargs(data, lr=1e-3, num_experts=4)` route a flat keyword to its class.
Names and meanings follow fairseq's where fairseq has the flag.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch

from moelab.model import ModelConfig
from moelab.presets import ARCHITECTURES, FAIRSEQ_MODEL_FLAGS, in_flag_names
from moelab.train.assignment import BALANCES
from moelab.train.method import METHODS, Method
from moelab.train.scoring import ESTEP_DTYPES

# The M-step's precision (--precision); auto is resolved per device when training starts.
PRECISIONS = ("auto", "float32", "bfloat16")
# Where the first --init-updates assignments come from (moelab.train.warm_start).
INIT_CLUSTERS = ("none", "tfidf")


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def _check_finite(obj, *names: str) -> None:
    """nan and inf parse as floats; as a learning rate or dropout they would silently ruin a run."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


@dataclass
class DataConfig:
    data: str = field(metadata=_help("data-bin folder written by `moelab preprocess`",
                                     positional="DATA_BIN"))
    tokens_per_sample: int = field(
        default=1024, metadata=_help("max tokens per training chunk (and the model's max length)"))
    max_tokens: int | None = field(
        default=3584, metadata=_help("max tokens in a batch (rows x longest row)"))
    max_sentences: int | None = field(
        default=None, metadata=_help("max chunks in a batch", aliases=("--batch-size",)))

    def __post_init__(self) -> None:
        self.data = str(self.data)
        if self.tokens_per_sample < 1:
            raise ValueError(f"--tokens-per-sample must be >= 1, got {self.tokens_per_sample}")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ValueError(f"--max-sentences must be >= 1, got {self.max_sentences}")
        if self.max_tokens is None and self.max_sentences is None:
            raise ValueError("set --max-tokens or --max-sentences so batches have a size")
        if self.max_tokens is not None and self.max_tokens < self.tokens_per_sample:
            raise ValueError(
                f"--max-tokens ({self.max_tokens}) must be >= --tokens-per-sample "
                f"({self.tokens_per_sample}) so that the longest chunk fits in a batch; raise "
                "--max-tokens or lower --tokens-per-sample")


@dataclass
class ModelArgs:
    """What to build: the preset, the training method and its K, and per-field overrides.

    Resolved into a `moelab.model.ModelConfig` by `model_config` once the data-bin's vocabulary
    is known. `None` means "the preset's value".
    """

    arch: str = field(default="transformer_lm",
                      metadata=_help("model size preset", choices=tuple(ARCHITECTURES)))
    method: str = field(default="hMoEup", metadata=_help(
        "dense (K=1 LM), hMoEup/hMoElp (hard EM, uniform/learned prior), sMoEup/sMoElp (soft)",
        choices=METHODS))
    num_experts: int | None = field(
        default=None, metadata=_help("K experts (default: 1 for dense, 3 otherwise)"))
    decoder_layers: int | None = field(default=None, metadata=_help("Transformer blocks"))
    decoder_embed_dim: int | None = field(default=None, metadata=_help("model width"))
    decoder_ffn_embed_dim: int | None = field(default=None, metadata=_help("MLP hidden width"))
    decoder_attention_heads: int | None = field(default=None, metadata=_help("attention heads"))
    share_decoder_input_output_embed: bool | None = field(default=None, metadata=_help(
        "tie input and output embeddings (moelab ties unless --no-share-... is given)",
        negatable=True))
    dropout: float = field(default=0.1, metadata=_help("dropout probability"))
    attention_dropout: float = field(default=0.0, metadata=_help("attention-weight dropout"))
    mean_pool_gating_network: bool | None = field(default=None, metadata=_help(
        "learned prior p(z|c) from the mean-pool gating network (on by default for *lp methods; "
        "unused with a uniform prior)"))
    mean_pool_gating_network_encoder_dim: int | None = field(
        default=None, metadata=_help("gating network width (default: the preset's)"))
    mean_pool_gating_network_dropout: float = field(
        default=0.0, metadata=_help("dropout inside the gating network"))

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown --arch {self.arch!r}; choose one of "
                             f"{', '.join(ARCHITECTURES)}")
        method = Method.parse(self.method)  # raises with the valid names
        if self.method == "dense":
            if self.num_experts not in (None, 1):
                raise ValueError(f"--method dense is a plain LM with one expert, got "
                                 f"--num-experts {self.num_experts}; drop --num-experts or pick "
                                 "a mixture method (hMoEup, hMoElp, sMoEup, sMoElp)")
            self.num_experts = 1
        elif self.num_experts is None:
            self.num_experts = 3  # fairseq translation_moe's default
        if self.num_experts < 1:
            raise ValueError(f"--num-experts must be >= 1, got {self.num_experts}")
        self._check_shape()
        if not method.uniform_prior:
            if self.mean_pool_gating_network is False:
                raise ValueError(f"--method {self.method} learns the prior p(z|c) and needs the "
                                 "gating network; set mean_pool_gating_network=True (or None)")
            self.mean_pool_gating_network = True

    def _check_shape(self) -> None:
        """ModelConfig's own checks, worded with the flags: the shape is checked in one place."""
        try:
            model_config(self, vocab_size=8, pad_id=0, tokens_per_sample=1)
        except ValueError as e:
            raise ValueError(f"{in_flag_names(str(e))} (--arch {self.arch} gives what is not "
                             "set)") from None

    @property
    def uses_gating(self) -> bool:
        """True when the learned prior is trained; a uniform prior never builds the network."""
        return not Method.parse(self.method).uniform_prior


# ModelArgs fields whose None means "the --arch value"
_SHAPE_FLAGS = ("decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim",
                "decoder_attention_heads", "share_decoder_input_output_embed",
                "mean_pool_gating_network_encoder_dim")


def model_config(args: ModelArgs, *, vocab_size: int, pad_id: int, tokens_per_sample: int,
                 input_only_ids: tuple[int, ...] | None = None) -> ModelConfig:
    """ModelArgs + the data-bin's vocabulary -> the model's ModelConfig.

    input_only_ids: the tokenizer's unk and bos (never targets); default ModelConfig's.
    """
    preset = {**dataclasses.asdict(ModelConfig(vocab_size=vocab_size)),
              **ARCHITECTURES[args.arch]}
    # the shape flags a user gave (None: the architecture's value), in ModelConfig's names
    overrides = {FAIRSEQ_MODEL_FLAGS[name]: getattr(args, name) for name in _SHAPE_FLAGS}
    values = {**preset, **{k: v for k, v in overrides.items() if v is not None}}
    values.update(
        vocab_size=vocab_size, pad_id=pad_id, num_experts=args.num_experts,
        max_seq_len=tokens_per_sample, dropout=args.dropout,
        attention_dropout=args.attention_dropout, gating=args.uses_gating,
        gating_dropout=args.mean_pool_gating_network_dropout,
    )
    if input_only_ids is not None:
        values["input_only_ids"] = tuple(input_only_ids)
    return ModelConfig(**values)


def parse_betas(value: str | tuple | list) -> tuple[float, float]:
    """'(0.9, 0.98)' (fairseq's spelling) or a pair -> (0.9, 0.98)."""
    try:
        pair = ast.literal_eval(value) if isinstance(value, str) else value
        beta1, beta2 = (float(b) for b in pair)
    except (ValueError, SyntaxError, TypeError):
        raise ValueError(f"--adam-betas must look like '(0.9, 0.98)', got {value!r}") from None
    return beta1, beta2


@dataclass
class OptimConfig:
    optimizer: str = field(default="adam", metadata=_help("only adam is implemented"))
    lr: float = field(default=7e-4, metadata=_help("peak learning rate (after warmup)"))
    adam_betas: tuple[float, float] = field(
        default=(0.9, 0.98), metadata=_help("Adam betas, e.g. '(0.9, 0.98)'", parse=parse_betas))
    adam_eps: float = field(default=1e-8, metadata=_help("Adam epsilon"))
    weight_decay: float = field(default=0.0, metadata=_help(
        "decoupled weight decay, as fairseq's adam (the AdamW update: w -= lr * wd * w, not "
        "added to the gradient)"))
    clip_norm: float = field(default=0.0, metadata=_help("clip gradient norm (0 = no clipping)"))
    lr_scheduler: str = field(default="inverse_sqrt",
                              metadata=_help("only inverse_sqrt is implemented"))
    warmup_updates: int = field(default=4000, metadata=_help("linear warmup updates"))
    warmup_init_lr: float = field(
        default=1e-7, metadata=_help("lr at update 0 (-1: 0 with warmup, else --lr)"))
    min_lr: float = field(default=1e-9, metadata=_help(
        "stop training once the learning rate decays to this or below, as fairseq (not a "
        "floor)"))

    def __post_init__(self) -> None:
        self.adam_betas = parse_betas(self.adam_betas)
        _check_finite(self, "lr", "adam_eps", "weight_decay", "clip_norm", "warmup_init_lr",
                      "min_lr")
        if not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"--adam-betas must both be in [0, 1), got {self.adam_betas}")
        if self.adam_eps < 0 or self.weight_decay < 0 or self.min_lr < 0:
            raise ValueError("--adam-eps, --weight-decay and --min-lr must be >= 0")
        if self.optimizer != "adam":
            raise ValueError(f"--optimizer {self.optimizer} is not supported: moelab trains with "
                             "adam (drop the flag or pass --optimizer adam)")
        if self.lr_scheduler != "inverse_sqrt":
            raise ValueError(f"--lr-scheduler {self.lr_scheduler} is not supported: moelab "
                             "implements inverse_sqrt (drop the flag or pass inverse_sqrt)")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_updates < 0:
            raise ValueError(f"--warmup-updates must be >= 0, got {self.warmup_updates}")
        if self.clip_norm < 0:
            raise ValueError(f"--clip-norm must be >= 0 (0 = no clipping), got {self.clip_norm}")
        if self.warmup_init_lr < 0:  # fairseq's -1 default: start from 0, or from lr without warmup
            self.warmup_init_lr = 0.0 if self.warmup_updates > 0 else self.lr


@dataclass
class TrainConfig:
    criterion: str = field(default="cross_entropy", metadata=_help(
        "only cross_entropy (the EM objective's per-token NLL) is implemented"))
    max_update: int = field(default=0, metadata=_help("stop after this many updates (0: off)"))
    max_epoch: int = field(default=0, metadata=_help("stop after this many epochs (0: off)"))
    max_flops: float = field(default=0.0, metadata=_help(
        "stop once training has spent this many model FLOPs (train_log's train_flops, e.g. "
        "2e15; moelab.train.compute says how they are counted; 0: off)"))
    stop_time_hours: float = field(default=0.0, metadata=_help(
        "stop once the run has taken this many hours in all (fairseq's flag: wall time since "
        "the first start, resumes summed, validation included; 0: off)"))
    update_freq: int = field(default=1, metadata=_help("accumulate gradients over N batches"))
    seed: int = field(default=1, metadata=_help("random seed (init, dropout, batch order)"))
    log_interval: int = field(default=100, metadata=_help("updates per train_log.jsonl line"))
    validate_interval_updates: int = field(
        default=0, metadata=_help("validate every N updates (0: only at the end)"))
    validate_interval_flops: float = field(default=0.0, metadata=_help(
        "also validate each time train_flops passes a multiple of X, so that runs of different "
        "cost are validated at the same compute (0: off)"))
    save_interval_updates: int = field(
        default=0, metadata=_help("save checkpoint_last.pt every N updates (0: at validation "
                                  "and at the end)"))
    save_dir: str = field(default="checkpoints", metadata=_help("where checkpoints and logs go"))
    restore_file: str = field(default="checkpoint_last.pt", metadata=_help(
        "checkpoint to resume from (relative paths are looked up in --save-dir)"))
    finetune_from_model: str | None = field(default=None, metadata=_help(
        "start from this dense (K = 1) checkpoint's network, as fairseq: its weights copied, "
        "each expert token its indicator token plus a small seeded perturbation, a fresh "
        "gating network, optimizer and schedule; its compute counts toward train_flops. "
        "Ignored when --save-dir already holds a checkpoint to resume"))
    max_bad_updates: int = field(default=10, metadata=_help(
        "stop after N updates in a row with a non-finite loss or gradient (each is skipped: no "
        "optimizer step, counted as skipped_updates in the log)"))
    device: str = field(default="auto", metadata=_help("auto (cuda if available), cpu, cuda[:N]"))
    progress_bar: bool = field(default=True, metadata=_help(
        "disable the tqdm progress bar", flag="--no-progress-bar"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the model body and loss (warns and runs eagerly if compiling fails)"))
    estep_tokens: int | None = field(default=None, metadata=_help(
        "E-step responsibilities from the first N tokens of each chunk (M-step unchanged)"))
    precision: str = field(default="auto", metadata=_help(
        "the M-step's precision: bfloat16 (autocast; log-softmax and reductions stay float32) "
        "or float32; auto: bfloat16 on CUDA, float32 elsewhere. The E-step and validation "
        "are float32 whatever this says (see --estep-dtype)", choices=PRECISIONS))
    estep_dtype: str | None = field(default=None, metadata=_help(
        "run the E-step (responsibilities only) in bfloat16 or float16; default float32 on "
        "every device, whatever --precision says. Faster on GPUs and CPUs with AMX/AVX-512 "
        "BF16; the winning expert may change on a few chunks"))
    prefetch: bool = field(default=True, metadata=_help(
        "load each update's batches in place instead of on a thread during the previous "
        "update (the batches are the same)", flag="--no-prefetch"))
    init_clusters: str = field(default="none", metadata=_help(
        "warm start: tfidf clusters the train documents (tf-idf, balanced k-means, K clusters) "
        "and each chunk trains its document's cluster's expert for the first --init-updates "
        "updates, then EM decides", choices=INIT_CLUSTERS))
    init_updates: int = field(default=0, metadata=_help(
        "updates whose assignment comes from --init-clusters"))
    # the remedies against collapse (moelab.train.assignment): they reshape the posterior the
    # M-step trains on, never the loss or evaluation; all off by default
    balance: str = field(default="none", metadata=_help(
        "sinkhorn: project each micro-batch's posterior onto equal expert shares (Sinkhorn-"
        "Knopp, over all ranks together; with --update-freq N, each of the N micro-batches on "
        "its own); hard EM trains the balanced plan's argmax, soft EM its weights",
        choices=BALANCES))
    prior_bias_rate: float = field(default=0.0, metadata=_help(
        "loss-free balancing of the learned prior: a per-expert bias on log p(z|c), used only "
        "to choose, moved by this much after each update toward idle experts (0: off)"))
    estep_temperature: float = field(default=1.0, metadata=_help(
        "deterministic annealing: the E-step posterior is softmax(l / T), T going linearly "
        "from this value to 1 over --anneal-updates, then 1 (soft EM, or hard EM with --balance "
        "sinkhorn: hard EM's argmax alone is the same at every T)"))
    anneal_updates: int = field(default=0, metadata=_help(
        "updates over which --estep-temperature goes linearly to 1 (0: no annealing)"))

    @property
    def estep_torch_dtype(self) -> torch.dtype | None:
        return None if self.estep_dtype is None else ESTEP_DTYPES[self.estep_dtype]

    def __post_init__(self) -> None:
        self.save_dir = str(self.save_dir)
        self.restore_file = str(self.restore_file)
        if self.estep_tokens is not None and self.estep_tokens < 1:
            raise ValueError(f"--estep-tokens must be >= 1 (omit it for the whole chunk), got "
                             f"{self.estep_tokens}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")
        if self.estep_dtype is not None and self.estep_dtype not in ESTEP_DTYPES:
            raise ValueError(f"--estep-dtype must be {' or '.join(ESTEP_DTYPES)} (omit it for "
                             f"the training dtype), got {self.estep_dtype!r}")
        if self.criterion != "cross_entropy":
            raise ValueError(f"--criterion {self.criterion} is not supported: moelab's EM "
                             "objective is cross_entropy (drop the flag)")
        _check_finite(self, "max_flops", "stop_time_hours", "validate_interval_flops")
        for name in ("max_flops", "stop_time_hours", "validate_interval_flops"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: off), got "
                                 f"{getattr(self, name)}")
        if (self.max_update <= 0 and self.max_epoch <= 0 and self.max_flops <= 0
                and self.stop_time_hours <= 0):
            raise ValueError("training has no end: set --max-update N (or --max-epoch N, "
                             "--max-flops X, --stop-time-hours H)")
        if self.finetune_from_model is not None and not str(self.finetune_from_model).strip():
            raise ValueError("--finetune-from-model must name a checkpoint file")
        if not self.restore_file.strip() or not self.save_dir.strip():
            raise ValueError("--restore-file and --save-dir must not be empty")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"--device {self.device!r} is not a device; use auto, cpu, "
                                 "cuda or cuda:N") from None
        self._check_warm_start()
        for name in ("update_freq", "log_interval", "max_bad_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        self._check_remedies()

    def _check_remedies(self) -> None:
        """The remedies' own values; how they fit the method is RunConfig's check."""
        _check_finite(self, "prior_bias_rate", "estep_temperature")
        if self.balance not in BALANCES:
            raise ValueError(f"--balance must be one of {', '.join(BALANCES)}, got "
                             f"{self.balance!r}")
        if self.prior_bias_rate < 0:
            raise ValueError(f"--prior-bias-rate must be >= 0 (0: off), got "
                             f"{self.prior_bias_rate}")
        if self.estep_temperature <= 0:
            raise ValueError(f"--estep-temperature must be > 0 (the posterior is "
                             f"softmax(l / T)), got {self.estep_temperature}")
        if self.anneal_updates < 0:
            raise ValueError(f"--anneal-updates must be >= 0, got {self.anneal_updates}")
        if self.anneal_updates > 0 and self.estep_temperature == 1:
            raise ValueError(f"--anneal-updates {self.anneal_updates} anneals nothing: the "
                             "temperature starts at --estep-temperature 1; give a starting "
                             "temperature, e.g. --estep-temperature 2")
        if self.estep_temperature != 1 and self.anneal_updates == 0:
            raise ValueError(f"--estep-temperature {self.estep_temperature} needs "
                             "--anneal-updates N > 0: the temperature goes to 1 over N updates "
                             "(with N = 0 it would be 1 from the start)")


    def _check_warm_start(self) -> None:
        if self.init_clusters not in INIT_CLUSTERS:
            raise ValueError(f"--init-clusters must be one of {', '.join(INIT_CLUSTERS)}, got "
                             f"{self.init_clusters!r}")
        if self.init_updates < 0:
            raise ValueError(f"--init-updates must be >= 0, got {self.init_updates}")
        if self.init_updates > 0 and self.init_clusters == "none":
            raise ValueError(f"--init-updates {self.init_updates} needs --init-clusters tfidf: "
                             "without clusters nothing chooses the experts of those updates")
        if self.init_clusters != "none" and self.init_updates == 0:
            raise ValueError(f"--init-clusters {self.init_clusters} needs --init-updates N > 0: "
                             "the clusters choose the experts of the first N updates only")
        if 0 < self.max_update < self.init_updates:
            raise ValueError(f"--init-updates {self.init_updates} is larger than --max-update "
                             f"{self.max_update}: EM would never take over; lower it")


CONFIG_CLASSES = {"data": DataConfig, "model": ModelArgs, "optim": OptimConfig,
                  "train": TrainConfig}


@dataclass
class RunConfig:
    """Everything one training run needs; `asdict` of it goes into every checkpoint."""

    data: DataConfig
    model: ModelArgs = field(default_factory=ModelArgs)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # raises without max_update

    def __post_init__(self) -> None:
        """A remedy combined with a method where it means nothing is refused, saying why."""
        t, m = self.train, self.model
        if t.prior_bias_rate > 0 and not m.uses_gating:
            raise ValueError(f"--prior-bias-rate biases the learned prior, and --method "
                             f"{m.method} has a uniform prior: use hMoElp or sMoElp, or drop "
                             "--prior-bias-rate")
        if m.num_experts == 1:
            for given, flag in ((t.balance != "none", f"--balance {t.balance}"),
                                (t.anneal_updates > 0, "--estep-temperature")):
                if given:
                    raise ValueError(f"{flag} reshapes the posterior over experts, and with "
                                     f"one expert (--method {m.method}, K = 1) it is always 1; "
                                     "use K >= 2 or drop the flag")
        if (t.anneal_updates > 0 and m.num_experts > 1 and Method.parse(m.method).hard
                and t.balance == "none"):
            raise ValueError(f"--estep-temperature anneals nothing with hard EM (--method "
                             f"{m.method}): it trains argmax_z softmax(l / T), which is argmax_z "
                             "l at every T; anneal soft EM (sMoEup, sMoElp), or add --balance "
                             "sinkhorn, whose plan the temperature does change")
        if t.init_clusters != "none" and m.num_experts == 1:
            raise ValueError(f"--init-clusters {t.init_clusters} needs K > 1 experts: "
                             "with one (--method dense or --num-experts 1) every chunk already "
                             "trains it")

    @classmethod
    def from_kwargs(cls, data: str | None = None, **kwargs) -> RunConfig:
        """Flat keywords (the flag names with underscores) -> RunConfig; unknown names raise."""
        groups: dict[str, dict] = {name: {} for name in CONFIG_CLASSES}
        if data is not None:
            groups["data"]["data"] = data
        owner = {f.name: group for group, klass in CONFIG_CLASSES.items() for f in fields(klass)}
        for key, value in kwargs.items():
            if key not in owner:
                raise ValueError(f"unknown training option {key!r}; valid options: "
                                 f"{', '.join(sorted(owner))}")
            groups[owner[key]][key] = value
        if "data" not in groups["data"]:
            raise ValueError("train needs the data-bin folder: train('data-bin/mix', ...)")
        return cls(**{group: CONFIG_CLASSES[group](**values) for group, values in groups.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """Inverse of to_dict (what a checkpoint stores); ignores keys a newer moelab dropped."""
        built = {}
        for group, klass in CONFIG_CLASSES.items():
            names = {f.name for f in fields(klass)}
            built[group] = klass(**{k: v for k, v in d.get(group, {}).items() if k in names})
        return cls(**built)
