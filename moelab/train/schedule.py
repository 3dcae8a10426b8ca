"""fairseq's inverse_sqrt learning-rate schedule and its --min-lr stop, as pure functions.

The schedule holds no state of its own: the rate is a function of the updates done, which the
train state keeps (moelab.train.state), so its checkpoint entry is a record, never read back.
"""

from __future__ import annotations

import math

from moelab.train.config import OptimConfig


def inverse_sqrt_lr(num_updates: int, *, lr: float, warmup_updates: int,
                    warmup_init_lr: float) -> float:
    """Learning rate after `num_updates` optimizer steps (update u uses inverse_sqrt_lr(u - 1)).

    Linear warmup from warmup_init_lr to lr over warmup_updates, then lr * sqrt(warmup / step),
    as fairseq's InverseSquareRootSchedule. Without warmup the decay starts at step 1
    (lr / sqrt(step)), where fairseq would divide by zero. There is no floor: --min-lr stops
    training instead (`below_min_lr`), as in fairseq.
    """
    if num_updates < warmup_updates:
        return warmup_init_lr + num_updates * (lr - warmup_init_lr) / warmup_updates
    if warmup_updates > 0:
        return lr * math.sqrt(warmup_updates / num_updates)
    return lr / math.sqrt(max(num_updates, 1))


def learning_rate(optim: OptimConfig, num_updates: int) -> float:
    """The learning rate for the next update, given how many updates are done."""
    return inverse_sqrt_lr(num_updates, lr=optim.lr, warmup_updates=optim.warmup_updates,
                           warmup_init_lr=optim.warmup_init_lr)


def below_min_lr(optim: OptimConfig, num_updates: int) -> bool:
    """fairseq's --min-lr: training stops once the decaying rate is at or below it.

    Only after warmup: a warmup that starts at 0 (--warmup-init-lr -1) is not a decay.
    fairseq checks at each epoch's start; moelab before every update, so no update ever runs
    at a rate below --min-lr.
    """
    return (num_updates >= optim.warmup_updates
            and learning_rate(optim, num_updates) <= optim.min_lr)


def schedule_state(optim: OptimConfig, num_updates: int) -> dict:
    """The schedule's checkpoint entry, as fairseq names it: {"name", "num_updates"}."""
    return {"name": optim.lr_scheduler, "num_updates": num_updates}
