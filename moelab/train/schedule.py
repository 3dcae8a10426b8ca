"""fairseq's inverse_sqrt learning-rate schedule, as a pure function of the update count."""

from __future__ import annotations

import math

from moelab.train.config import OptimConfig


def inverse_sqrt_lr(num_updates: int, *, lr: float, warmup_updates: int, warmup_init_lr: float,
                    min_lr: float = 0.0) -> float:
    """Learning rate after `num_updates` optimizer steps (update u uses inverse_sqrt_lr(u - 1)).

    Linear warmup from warmup_init_lr to lr over warmup_updates, then lr * sqrt(warmup / step),
    as fairseq's InverseSquareRootSchedule; min_lr is a floor. Without warmup the decay starts
    at step 1 (lr / sqrt(step)), where fairseq would divide by zero.
    """
    if num_updates < warmup_updates:
        value = warmup_init_lr + num_updates * (lr - warmup_init_lr) / warmup_updates
    elif warmup_updates > 0:
        value = lr * math.sqrt(warmup_updates / num_updates)
    else:
        value = lr / math.sqrt(max(num_updates, 1))
    return max(value, min_lr)


def learning_rate(optim: OptimConfig, num_updates: int) -> float:
    """The learning rate for the next update, given how many updates are done."""
    return inverse_sqrt_lr(num_updates, lr=optim.lr, warmup_updates=optim.warmup_updates,
                           warmup_init_lr=optim.warmup_init_lr, min_lr=optim.min_lr)
