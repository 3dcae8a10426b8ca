"""Draw docs/figures/how_it_works.png: one online-EM step on one chunk of a document.

Run from the repository root: `python docs/figures/make_how_it_works.py`. A schematic, not data:
the posterior's bar heights are made up.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).with_name("how_it_works.png")
K = 3
POSTERIOR = (0.08, 0.87, 0.05)  # illustrative
CHOSEN = 1
GREY, BLUE, ORANGE, GREEN = "#d9d9d9", "#9ecae1", "#fdae6b", "#74c476"


def box(ax, x, y, w, h, text, color, size=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=color, edgecolor="#444444", linewidth=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
            fontweight=weight)


def arrow(ax, start, end, text="", offset=(0, 0.12)):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11,
                                 color="#444444", linewidth=0.9))
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], text,
                ha="center", va="bottom", fontsize=7.5, color="#333333")


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.set_xlim(0, 11.2)
    ax.set_ylim(0, 4.4)
    ax.axis("off")

    # 1. a document cut into chunks: the chunk x, its context c before it
    ax.text(0.1, 4.15, "1. a document, cut into chunks of T tokens", fontsize=9.5,
            fontweight="bold")
    box(ax, 0.1, 3.35, 1.0, 0.5, "chunk 1", GREY)
    box(ax, 1.2, 3.35, 1.0, 0.5, "chunk 2", GREY)
    box(ax, 2.3, 3.35, 1.0, 0.5, "chunk 3: x", BLUE, size=8.5, weight="bold")
    box(ax, 3.4, 3.35, 0.8, 0.5, "...", GREY)
    ax.annotate("", xy=(0.1, 3.25), xytext=(2.2, 3.25),
                arrowprops=dict(arrowstyle="<->", color="#666666", lw=0.8))
    ax.text(1.15, 3.02, "context c (read by the prior only)", ha="center", fontsize=7.5)

    # 2. E-step: K forwards, one per expert token
    ax.text(0.1, 2.55, "2. E-step: K forwards, dropout off, no gradient", fontsize=9.5,
            fontweight="bold")
    for k in range(K):
        y = 1.85 - 0.62 * k
        box(ax, 0.1, y, 0.95, 0.45, f"<expert_{k}>", ORANGE, size=8)
        box(ax, 1.1, y, 1.2, 0.45, "x", BLUE, size=8)
        arrow(ax, (2.35, y + 0.22), (3.05, y + 0.22))
        box(ax, 3.1, y, 1.55, 0.45, f"l_{k} = log p({k}|c)\n+ log p(x|{k})", "white", size=7)
        arrow(ax, (4.7, y + 0.22), (5.35, 1.15))

    # 3. posterior
    ax.text(5.25, 2.4, "3. posterior\n    r = softmax(l)", fontsize=9.5, fontweight="bold")
    for k, p in enumerate(POSTERIOR):
        x = 5.45 + 0.45 * k
        ax.add_patch(plt.Rectangle((x, 0.55), 0.32, 1.6 * p,
                                   facecolor=GREEN if k == CHOSEN else GREY,
                                   edgecolor="#444444", linewidth=0.6))
        ax.text(x + 0.16, 0.35, f"z={k}", ha="center", fontsize=7.5)
        ax.text(x + 0.16, 0.6 + 1.6 * p, f"{p:.2f}", ha="center", fontsize=7)

    # 4. M-step
    arrow(ax, (6.85, 1.3), (7.75, 1.3))
    ax.text(7.8, 2.55, "4. M-step, dropout on, with gradient", fontsize=9.5, fontweight="bold")
    box(ax, 7.85, 1.45, 3.1, 0.8,
        f"hard EM: train <expert_{CHOSEN}> on x alone\nloss -l_z*,  z* = argmax r",
        GREEN, size=8)
    box(ax, 7.85, 0.45, 3.1, 0.8,
        "soft EM: train every expert\nloss -log sum_z exp(l_z), weights r",
        "#c7e9c0", size=8)
    fig.text(0.5, 0.015, "one shared Transformer: the experts differ only by their first "
             "token <expert_z>", ha="center", fontsize=8.5, style="italic")
    fig.savefig(OUT, dpi=90, bbox_inches="tight")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
