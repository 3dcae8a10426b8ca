"""The notebook sampler: a prompt, an expert (one, all side by side, auto, or the mixture of the
top K'), Generate.

`Sampler.generate()` is what the Generate button calls, so everything the widget does can be
driven and read without a browser: set `sampler.prompt.value`, `sampler.expert.value`, call
`generate()`, then read `sampler.texts` (plain text per expert) or the widgets' `.value`.
Text streams into the panels as it is sampled (moelab.generate.stream); under `auto` and the
mixture the posterior p(expert | prompt) is shown with the chosen expert(s).
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Iterator
from pathlib import Path

import ipywidgets as widgets

from moelab.data import Tokenizer
from moelab.generate import (
    TOPK,
    GenerationConfig,
    PromptTruncatedWarning,
    expert_posterior,
    stream,
    top_experts,
)
from moelab.model import MixtureLM
from moelab.train.run import Run

_LABEL = {"description_width": "110px"}
_TEXT_STYLE = ("white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 13px; "
               "line-height: 1.4; font-family: var(--jp-code-font-family, monospace)")


def panel_html(title: str, prompt: str, text: str, *, done: bool) -> str:
    """One expert's panel: a title, then the prompt (shaded) and the continuation."""
    cursor = "" if done else "<span style='color:#1f77b4'>▌</span>"
    return (f"<div style='font-weight:600; margin-bottom:4px'>{html.escape(title)}</div>"
            f"<pre class='moelab-sample' style='{_TEXT_STYLE}'>"
            f"<span style='color:#555; background:#e8eef7'>{html.escape(prompt)}</span>"
            f"{html.escape(text)}{cursor}</pre>")


def posterior_html(posterior, chosen: int | list[int]) -> str:
    """p(expert | prompt) as a small bar chart; the chosen expert (auto) or experts (the
    mixture of the top K') in bold."""
    several = isinstance(chosen, list)
    picked = set(chosen) if several else {chosen}
    rows = []
    for k, p in enumerate(float(x) for x in posterior):
        weight = "font-weight:700" if k in picked else ""
        color = "#1f77b4" if k in picked else "#9ecae1"
        rows.append(
            f"<tr style='{weight}'><td style='padding:0 8px 0 0'>expert {k}</td>"
            f"<td style='width:200px'><div style='background:{color}; height:10px; "
            f"width:{max(p, 0.0) * 100:.1f}%'></div></td>"
            f"<td style='padding-left:8px; text-align:right'>{p:.3f}</td></tr>")
    heading = (f"<b>mixture</b>: experts {', '.join(map(str, chosen))} have the highest "
               "posterior p(expert | prompt); they are mixed by it, and each new token updates "
               "it" if several else
               f"<b>auto</b>: expert {chosen} has the highest posterior p(expert | prompt)")
    return (f"<div style='margin:4px 0'>{heading}</div>"
            f"<table style='border-collapse:collapse; font-size:12px'>{''.join(rows)}</table>")


class Sampler:
    """Per-expert sampling with ipywidgets. Display it (last line of a cell) to use it."""

    def __init__(self, model: MixtureLM, tokenizer: Tokenizer, *, prompt: str = "",
                 title: str | None = None, max_new_tokens: int = 80, temperature: float = 1.0,
                 top_p: float = 0.9, seed: int = 1):
        self.model, self.tokenizer = model, tokenizer
        K = model.num_experts
        experts = [(f"expert {k}", k) for k in range(K)]
        choices = [("auto (highest posterior)", "auto"), ("all, side by side", "all"),
                   ("mixture (top K')", "topk"), *experts]
        self.prompt = widgets.Textarea(value=prompt, placeholder="Type a prompt (may be empty)",
                                       description="prompt", style=_LABEL,
                                       layout=widgets.Layout(width="98%", height="4.5em"))
        self.expert = widgets.Dropdown(options=choices if K > 1 else experts,
                                       value="auto" if K > 1 else 0, description="expert",
                                       style=_LABEL)
        # K' of the mixture choice: the experts of highest posterior that it mixes
        self.top_k = widgets.IntSlider(value=min(2, K), min=1, max=K, description="top K'",
                                       style=_LABEL)
        self.temperature = widgets.FloatSlider(value=temperature, min=0.1, max=2.0, step=0.05,
                                               description="temperature", style=_LABEL,
                                               readout_format=".2f")
        self.top_p = widgets.FloatSlider(value=top_p, min=0.05, max=1.0, step=0.05,
                                         description="top-p", style=_LABEL, readout_format=".2f")
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=1, max=500,
                                                description="max new tokens", style=_LABEL)
        self.seed = widgets.IntText(value=seed, description="seed", style=_LABEL,
                                    layout=widgets.Layout(width="220px"))
        self.button = widgets.Button(description="Generate", button_style="primary",
                                     icon="play", tooltip="sample a continuation")
        self.status = widgets.HTML()
        self.posterior = widgets.HTML()
        self.outputs = widgets.GridBox(layout=widgets.Layout(
            grid_template_columns="repeat(auto-fill, minmax(280px, 1fr))", grid_gap="12px",
            width="98%"))
        self.panels: dict[int | str, widgets.HTML] = {}
        # expert (or "topk:K'" for the mixture) -> continuation of the last generate()
        self.texts: dict[int | str, str] = {}
        self.button.on_click(self._on_click)
        header = [widgets.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        controls = widgets.HBox([
            widgets.VBox([self.expert, self.top_k, self.seed, self.button]),
            widgets.VBox([self.temperature, self.top_p, self.max_new_tokens]),
        ])
        self.widget = widgets.VBox([*header, self.prompt, controls, self.status, self.posterior,
                                    self.outputs])

    @classmethod
    def from_run(cls, save_dir: str | Path, *, data_bin: str | Path | None = None,
                 **kwargs) -> Sampler:
        """A sampler for the best checkpoint of a `moelab train` save dir."""
        run = Run.load(save_dir, data_bin=data_bin)
        kwargs.setdefault("title", f"{run.method} (K={run.num_experts}) from {save_dir}")
        return cls(run.model, run.tokenizer, **kwargs)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def config(self) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens.value, sampling=True,
                                temperature=self.temperature.value, top_p=self.top_p.value,
                                seed=int(self.seed.value))

    def _on_click(self, _button=None) -> None:
        try:
            self.generate()
        except Exception as e:  # a callback's exception would vanish into the kernel log
            self.status.value = (f"<span style='color:#c00'>error: "
                                 f"{html.escape(f'{type(e).__name__}: {e}')}</span>")

    def generate(self) -> dict[int | str, str]:
        """Sample from the chosen expert(s), streaming into the panels; -> {expert: text}
        (the mixture's key is "topk:K'")."""
        prompt, choice, config = self.prompt.value, self.expert.value, self.config()
        self.button.disabled = True
        self.status.value = "<i>generating…</i>"
        self.posterior.value = ""
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PromptTruncatedWarning)
                if choice == "auto":
                    posterior = expert_posterior(self.model, self.tokenizer, prompt)
                    experts: list[int | str] = [int(posterior.argmax())]
                    self.posterior.value = posterior_html(posterior, experts[0])
                    titles = {experts[0]: f"expert {experts[0]}"}
                elif choice == "topk":
                    posterior = expert_posterior(self.model, self.tokenizer, prompt)
                    mixed = top_experts(posterior, self.top_k.value)
                    self.posterior.value = posterior_html(posterior, mixed)
                    experts = [f"{TOPK}{self.top_k.value}"]
                    titles = {experts[0]: f"mixture of experts {', '.join(map(str, mixed))}"}
                else:
                    experts = (list(range(self.model.num_experts)) if choice == "all"
                               else [int(choice)])
                    titles = {k: f"expert {k}" for k in experts}
                self._stream(prompt, titles, config)
            notes = [html.escape(str(w.message)) for w in caught]
            self.status.value = "<br>".join(notes)
        finally:
            self.button.disabled = False
        return dict(self.texts)

    def _stream(self, prompt: str, titles: dict[int | str, str],
                config: GenerationConfig) -> None:
        """All chosen experts (each titled) advance together, one piece each in turn (same seed
        for each)."""
        self.texts = {k: "" for k in titles}
        self.panels = {k: widgets.HTML(panel_html(title, prompt, "", done=False))
                       for k, title in titles.items()}
        self.outputs.children = list(self.panels.values())
        live: dict[int | str, Iterator[str]] = {
            k: stream(self.model, self.tokenizer, prompt, expert=k, config=config)
            for k in titles}
        while live:
            for k in list(live):
                piece = next(live[k], None)
                if piece is None:
                    del live[k]
                else:
                    self.texts[k] += piece
                self.panels[k].value = panel_html(titles[k], prompt, self.texts[k],
                                                  done=piece is None)
