"""torch.compile with a clean fallback: if compiling fails, warn once and run eagerly.

Compilation can fail at `torch.compile` (an unsupported platform) or, more often, at the first
call (no C++ compiler for the CPU backend, an unsupported Triton/GPU): either way training must go
on, only slower. The eager function computes the same values, so falling back is always safe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


class CompiledOrEager:
    """Calls torch.compile(fn); on any error from compiling or a compiled call, uses fn itself."""

    def __init__(self, fn: Callable, **compile_kwargs):
        self.eager = fn
        self.name = getattr(fn, "__qualname__", repr(fn))
        self.compiled: Callable | None = None
        self.error: str | None = None
        try:
            self.compiled = torch.compile(fn, **compile_kwargs)
        except Exception as e:  # any failure means: run eagerly
            self._fall_back(e)

    def _fall_back(self, error: Exception) -> None:
        self.compiled = None
        self.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        warnings.warn(f"torch.compile of {self.name} failed ({self.error}); running it eagerly "
                      "(same results, slower)", RuntimeWarning, stacklevel=3)

    @property
    def active(self) -> bool:
        """True while the compiled version is in use."""
        return self.compiled is not None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # the eager call re-raises real errors
                self._fall_back(e)
        return self.eager(*args, **kwargs)
