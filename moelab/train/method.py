"""The training method: hard or soft EM, with a uniform or a learned prior, as one value."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("dense", "hMoEup", "hMoElp", "sMoEup", "sMoElp")


@dataclass(frozen=True)
class Method:
    """A method name read once, at the edge; inside, code asks `method.hard` and
    `method.uniform_prior` (docs/design.md section 2)."""

    name: str
    hard: bool  # hard EM trains the winner argmax_z r_z alone; soft EM all experts, weighted by r
    uniform_prior: bool  # log p(z) = -log K; else log p(z | c) from the gating network

    @classmethod
    def parse(cls, name: str) -> Method:
        """`dense` is a K=1 plain LM, trained as hard EM with a uniform prior."""
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
        hard = name == "dense" or name.startswith("h")
        uniform_prior = name == "dense" or name.endswith("up")
        return cls(name, hard, uniform_prior)
