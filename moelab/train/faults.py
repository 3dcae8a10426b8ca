"""A testing hook: MOELAB_FAULT makes the process SIGKILL itself at a precise point of training.

Crash-safety is only believable if it is tested at the worst moments, and a kill timed from
outside rarely lands there. So the tests set, for example, ``MOELAB_FAULT=save:3`` and the trainer
kills itself (SIGKILL: no cleanup, no `finally`, exactly like the OOM killer or a pre-emption)
when it reaches that point. Points, each counted from 1 within one process:

- ``step:N``     inside the N-th update, after backward and before the optimizer step
- ``valid:N``    in the middle of the N-th validation (after its first batch)
- ``save:N``     halfway through writing the N-th checkpoint file (half the bytes on disk)
- ``replace:N``  after the N-th checkpoint file is complete and verified, before it replaces the
                 old one

Several points may be given, comma-separated; the first one reached kills the process. This is
a testing hook, not a feature: when MOELAB_FAULT is unset (always, outside tests) `hit` is a
function that returns at once.
"""

from __future__ import annotations

import os
import signal

ENV = "MOELAB_FAULT"
POINTS = ("step", "valid", "save", "replace")


def parse(spec: str) -> dict[str, int]:
    """'step:7,save:2' -> {'step': 7, 'save': 2}; a malformed spec raises ValueError."""
    plan = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, count = item.partition(":")
        if point not in POINTS or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV}={spec!r}: each item must be POINT:N with N >= 1 and POINT "
                             f"one of {', '.join(POINTS)}")
        plan[point] = int(count)
    return plan


_plan = parse(os.environ.get(ENV, ""))
_seen = dict.fromkeys(POINTS, 0)


def _hit(point: str) -> None:
    _seen[point] += 1
    if _plan.get(point) == _seen[point]:
        os.kill(os.getpid(), signal.SIGKILL)


def _no_fault(point: str) -> None:
    pass


def armed(point: str) -> bool:
    """True when the next `hit(point)` kills the process (lets a caller prepare the damage)."""
    return _plan.get(point) == _seen[point] + 1


hit = _hit if _plan else _no_fault
