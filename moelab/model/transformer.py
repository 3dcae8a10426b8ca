"""A decoder-only Transformer language model and its configuration, in one readable file.

The block is pre-LN (LayerNorm before attention and MLP, one final LayerNorm) with learned
positions, as in GPT-2/nanoGPT. fairseq's `transformer_lm` defaults to post-LN with sinusoidal
positions; pre-LN is chosen because it trains stably at fairseq's learning rate (7e-4) with short
warmups and at the tiny CPU sizes the tests use, where post-LN needs careful warmup to not diverge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.presets import ARCHITECTURES


@dataclass
class ModelConfig:
    vocab_size: int  # tokenizer vocabulary WITHOUT expert tokens
    num_experts: int = 1  # K; expert tokens get ids vocab_size .. vocab_size+K-1
    n_layer: int = 2  # Transformer blocks
    n_embd: int = 128  # model width d
    n_head: int = 4  # attention heads; must divide n_embd
    ffn_dim: int = 512  # hidden width of each block's MLP
    max_seq_len: int = 256  # tokens-per-sample: longest input (the expert token takes position 0)
    dropout: float = 0.1  # on embeddings and residual branches, training only
    attention_dropout: float = 0.0  # on attention weights, training only
    share_input_output_embed: bool = True  # tie the output projection to the token embedding
    gating: bool = False  # learned prior p(z|c) from the mean-pool gating network
    gating_dim: int = 128  # gating network width (--mean-pool-gating-network-encoder-dim)
    gating_dropout: float = 0.0  # dropout between the gating network's two layers
    pad_id: int = 0  # padding id of the tokenizer (a real id < vocab_size)
    # Ids that are inputs only, never targets (moelab's tokenizer: unk 0, bos 1, pad 3): left out
    # of the output distribution with pad_id and the expert tokens, so log p sums to one over
    # the tokens a text can contain and no gradient reaches those rows through the softmax.
    input_only_ids: tuple[int, ...] = (0, 1, 3)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "n_layer", "n_embd", "n_head", "ffn_dim", "max_seq_len",
                    "gating_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts < 1:
            raise ValueError(f"ModelConfig.num_experts (K) must be >= 1, got {self.num_experts}; "
                             "use num_experts=1 for a plain (dense) language model")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"ModelConfig.n_embd ({self.n_embd}) must be divisible by "
                             f"ModelConfig.n_head ({self.n_head}); e.g. ModelConfig.n_head = "
                             f"{_divisor_hint(self.n_embd)}")
        for name in ("dropout", "attention_dropout", "gating_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        self.input_only_ids = tuple(int(i) for i in self.input_only_ids)  # a list from JSON
        bad = [i for i in self.input_only_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ModelConfig.input_only_ids {bad} must be token ids in "
                             f"[0, vocab_size={self.vocab_size})")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"ModelConfig.pad_id ({self.pad_id}) must be a token id in "
                             f"[0, vocab_size={self.vocab_size})")

    @property
    def non_target_ids(self) -> tuple[int, ...]:
        """Ids of the real vocabulary that are never predicted: input_only_ids and pad_id."""
        return tuple(sorted({*self.input_only_ids, self.pad_id}))

    @property
    def total_vocab(self) -> int:
        """Embedding rows: the tokenizer's vocabulary plus the K expert tokens."""
        return self.vocab_size + self.num_experts


def _divisor_hint(n: int) -> int:
    return max(h for h in (1, 2, 4, 8, 12, 16) if n % h == 0)


def config_from_preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig from an `--arch` name (moelab.presets.ARCHITECTURES); overrides (vocab_size at
    least) win over the architecture's values."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model preset {name!r}; valid presets: "
                         f"{', '.join(ARCHITECTURES)}")
    valid = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; "
                         f"valid: {', '.join(sorted(valid))}")
    if "vocab_size" not in overrides:
        raise ValueError("config_from_preset needs vocab_size=<tokenizer vocabulary size>")
    return ModelConfig(**{**ARCHITECTURES[name], **overrides})


class KVCache:
    """Keys and values of every layer for the tokens already fed, so generation feeds only new ones.

    Rows are sequences (beams); `reorder` follows beam search's choice of parents. Generation
    only: training and scoring never pass a cache.
    """

    def __init__(self, n_layer: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layer  # each (B, nh, S, hs)
        self.values: list[torch.Tensor | None] = [None] * n_layer

    def __len__(self) -> int:
        """Positions cached so far (the same in every layer once a forward has finished)."""
        k = self.keys[-1]
        return 0 if k is None else k.shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's (B, nh, T, hs) keys/values; return all of them (B, nh, S + T, hs)."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows[i] as row i (beam search: each surviving beam's parent)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k[rows], v[rows]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.attention_dropout = config.attention_dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
                ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # (B, nh, T, hs)
        past = 0
        if cache is not None:
            past = cache.keys[layer].shape[2] if cache.keys[layer] is not None else 0
            k, v = cache.append(layer, k, v)  # (B, nh, past + T, hs)
        mask = None
        if past > 0 and T > 1:
            # SDPA's is_causal aligns the triangle top-left, which is wrong once keys outnumber
            # queries: query i sits at position past + i and may see keys 0 .. past + i.
            mask = (torch.arange(past + T, device=x.device)[None, :]
                    <= past + torch.arange(T, device=x.device)[:, None])  # (T, past + T)
        # one new query after a cache may see every key: no mask at all
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=past == 0 and T > 1,
            dropout_p=self.attention_dropout if self.training else 0.0,  # no dropout in eval
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.ffn_dim)
        self.proj = nn.Linear(config.ffn_dim, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
                ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class Transformer(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size + K)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.total_vocab, config.n_embd)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.total_vocab, bias=False)
        if config.share_input_output_embed:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale residual projections so the residual stream's variance does not grow
        # with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits for input_ids (B, T). With a cache, input_ids continue the cached positions."""
        return self.lm_head(self.hidden(input_ids, cache))  # (B, T, V + K)

    def hidden(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), before the output projection.

        Scoring projects only the positions it needs, a chunk at a time
        (moelab.model.log_probs.target_log_probs), instead of materializing (B, T, V + K) logits.
        """
        T = input_ids.shape[1]
        start = len(cache) if cache is not None else 0
        if self.config.max_seq_len < start + T:
            raise ValueError(f"input length {start + T} exceeds max_seq_len="
                             f"{self.config.max_seq_len}; use shorter chunks (tokens-per-sample) "
                             "or a larger max_seq_len")
        pos = torch.arange(start, start + T, device=input_ids.device)  # (T,)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)  # (B, T, C)
        return self.ln_f(x)  # (B, T, C)
