"""`python -m moelab ...` (also what `torchrun -m moelab train ...` runs)."""

from moelab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
