"""Speed work: `moelab bench` output, and every optimization exact where it claims to be."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_em import V, make_batch, make_model

import moelab
import moelab.bench as bench
from moelab import cli, presets
from moelab.bench import harness, reference, runner
from moelab.bench import techniques as ablations
from moelab.model import MixtureLM, ModelConfig, log_probs
from moelab.model.mixture import ScoringFunctions
from moelab.train.compute import batch_flops
from moelab.train.method import Method
from moelab.train.objectives import em_step
from moelab.train.scoring import ExpertScorer


@pytest.mark.slow
def test_bench_prints_one_json_line_with_the_figures(monkeypatch, capsys):
    # a smaller tiny preset keeps the test fast; the figures' meaning does not change
    monkeypatch.setitem(presets.BENCHMARKS, "tiny", presets.BenchmarkPreset(
        "tiny", vocab_size=600, num_experts=3, tokens_per_sample=32, max_tokens=128,
        dropout=0.1))
    assert cli.main(["bench", "--preset", "tiny", "--steps", "3", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    for key in ("tokens_per_s", "reference_tokens_per_s", "ratio", "peak_memory_bytes",
                "eval_tokens_per_s", "sample_tokens_per_s_cache", "sample_tokens_per_s_no_cache",
                "kv_cache_speedup", "flops_per_token"):
        assert isinstance(out[key], (int, float)) and out[key] > 0, key
    assert out["mfu"] is None  # CPU: no meaningful peak to compare with
    # the figure is moelab.train.compute's count (checked against FlopCounterMode in
    # tests/test_compute.py) of the timed step: the preset's model on its batch, hard EM
    preset = presets.BENCHMARKS["tiny"]
    model = harness.bench_model(bench.BenchConfig(preset="tiny", device="cpu"), preset,
                                torch.device("cpu"), dropout=preset.dropout)
    batch = harness.synthetic_batch(rows=preset.max_tokens // preset.tokens_per_sample,
                                    seq_len=preset.tokens_per_sample,
                                    vocab_size=preset.vocab_size, pad_id=3,
                                    generator=torch.Generator().manual_seed(0))
    flops = batch_flops(model.config, batch.lengths, preset.tokens_per_sample,
                        method=Method.parse("hMoEup"))
    assert out["flops_per_token"] == pytest.approx(flops.total / batch.num_tokens, rel=1e-12)
    assert out["flops_by_part"]["estep"] == flops.estep > 0
    assert out["num_experts"] == 3 and out["method"] == "hMoEup"
    assert {"batched_estep", "chunked_loss_estep", "chunked_loss_mstep",
            "sdpa_attention_estep", "reuse_estep_dropout0_hard"} <= set(out["techniques"])


def test_bench_techniques_run_under_the_m_steps_bf16_autocast(monkeypatch, capsys):
    # CUDA's bf16 M-step, with CPU autocast standing in: the reuse figure is then measured in
    # float32 (ExpertScorer refuses reuse under autocast) and says so in its name
    monkeypatch.setitem(presets.BENCHMARKS, "tiny", presets.BenchmarkPreset(
        "tiny", vocab_size=600, num_experts=3, tokens_per_sample=32, max_tokens=128,
        dropout=0.1))
    for module in (runner, ablations):
        monkeypatch.setattr(module, "autocast_context", lambda device, precision="auto": (
            lambda: torch.autocast("cpu", dtype=torch.bfloat16)))
    assert cli.main(["bench", "--preset", "tiny", "--steps", "2", "--device", "cpu",
                     "--no-reference", "--no-eval-sample"]) == 0
    techniques = json.loads(capsys.readouterr().out)["techniques"]
    assert techniques["reuse_estep_dropout0_float32_hard"] > 0
    assert "reuse_estep_dropout0_hard" not in techniques


def test_bench_without_the_reference_times_moelab_only(monkeypatch, capsys):
    monkeypatch.setitem(presets.BENCHMARKS, "tiny", presets.BenchmarkPreset(
        "tiny", vocab_size=600, num_experts=3, tokens_per_sample=32, max_tokens=128,
        dropout=0.1))
    assert cli.main(["bench", "--preset", "tiny", "--steps", "2", "--device", "cpu",
                     "--num-experts", "5", "--no-reference", "--no-techniques",
                     "--no-eval-sample"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_experts"] == 5 and out["tokens_per_s"] > 0 and out["peak_memory_bytes"] > 0
    assert out["ratio"] is None and out["reference_tokens_per_s"] is None
    assert "techniques" not in out and "eval_tokens_per_s" not in out


def test_mfu_peak_is_the_h200_dense_bf16_peak():
    """The MFU denominator, derived from the hardware: Hopper (H100/H200 SXM) has 132 SMs, each
    with 4 tensor cores doing 512 dense bf16 multiply-adds per clock, at a 1.83 GHz boost:
    989.4 TFLOPS, NVIDIA's datasheet figure without sparsity."""
    peak = 132 * 4 * 512 * 2 * 1.83e9
    assert pytest.approx(peak, rel=1e-3) == harness.PEAK_FLOPS


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("keep", [True, False])  # softmax kept for backward, or recomputed
def test_chunked_log_likelihood_equals_plain(monkeypatch, keep):
    if not keep:
        monkeypatch.setitem(log_probs.SAVE_ELEMENTS, "cpu", 0)
    torch.manual_seed(0)
    hidden = torch.randn(53, 16, requires_grad=True)
    weight = torch.randn(70, 16, requires_grad=True)
    targets = torch.randint(0, 70, (53,))
    grad = torch.randn(53)
    chunked = log_probs.target_log_probs(hidden, weight, targets, rows=8)  # 53 = 6 x 8 + 5
    chunked.backward(grad)
    got = chunked.detach(), hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = -F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    plain.backward(grad)
    torch.testing.assert_close(got[0], plain.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2], weight.grad, atol=1e-5, rtol=1e-5)


def test_chunked_log_likelihood_without_autograd_equals_plain():
    """The E-step's path: one logits buffer reused by every chunk, the last one partial."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(53, 16), torch.randn(70, 16)
    targets = torch.randint(0, 70, (53,))
    with torch.no_grad():
        chunked = log_probs.target_log_probs(hidden, weight, targets, rows=8)
    plain = -F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


def test_kept_softmax_survives_a_retained_backward():
    """Backward writes its gradient beside the kept softmax, not over it."""
    torch.manual_seed(0)
    hidden = torch.randn(21, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    out = log_probs.target_log_probs(hidden, weight, torch.randint(0, 30, (21,)), rows=8)
    first = torch.autograd.grad(out.sum(), (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (hidden, weight))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_chunked_log_likelihood_gradcheck():
    torch.manual_seed(0)
    hidden = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (9,))
    assert torch.autograd.gradcheck(
        lambda h, w: log_probs.target_log_probs(h, w, targets, rows=4), (hidden, weight))


def test_model_scores_equal_the_full_logits_formula():
    model = make_model(K=3).eval()
    batch = make_batch()
    experts = torch.tensor([0, 2, 1, 0])
    inputs = torch.cat([(V + experts)[:, None], batch.tokens[:, :-1]], dim=1)
    # written out: the real vocabulary's rows of the tied head, unk/bos/pad never predicted
    logits = model.transformer.hidden(inputs) @ model.transformer.tok_emb.weight[:V].t()
    logits[..., [0, 1, 3]] = -math.inf
    nll = F.cross_entropy(logits.flatten(0, 1), batch.tokens.flatten(), reduction="none")
    mask = torch.arange(10) < batch.lengths[:, None]
    expected = torch.where(mask, -nll.view(4, 10), 0.0)
    got = model.token_log_probs(batch.tokens, batch.lengths, experts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the fairseq-style reference (manual attention, full log-softmax) is the same function
    ref = reference.reference_log_likelihood(model, batch.tokens, batch.lengths, experts)
    torch.testing.assert_close(ref, expected.sum(1), atol=1e-5, rtol=1e-5)


def _loss_and_grads(model: MixtureLM, batch, method: Method, *, reuse_estep: bool):
    model.zero_grad(set_to_none=True)
    out = em_step(ExpertScorer(model, reuse_estep=reuse_estep), batch, method)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("method", ["hMoEup", "hMoElp", "sMoEup", "sMoElp"])
def test_reused_estep_gives_the_same_loss_and_gradients(method):
    model = make_model(K=3).train()  # dropout 0: E-step and M-step forwards are one function
    batch = make_batch()
    fused, g_fused = _loss_and_grads(model, batch, Method.parse(method), reuse_estep=True)
    plain, g_plain = _loss_and_grads(model, batch, Method.parse(method), reuse_estep=False)
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.nll, plain.nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.responsibilities, plain.responsibilities, atol=1e-6,
                               rtol=1e-5)
    assert not fused.responsibilities.requires_grad
    assert g_fused.keys() == g_plain.keys()
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_reused_estep_is_refused_with_dropout():
    model = make_model(K=3, dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        em_step(ExpertScorer(model, reuse_estep=True), make_batch(), Method.parse("sMoEup"))
    # by default it is simply not used: the M-step keeps its own dropout pass
    a = em_step(ExpertScorer(model), make_batch(), Method.parse("sMoEup"))
    b = em_step(ExpertScorer(model), make_batch(), Method.parse("sMoEup"))
    assert a.loss.item() != b.loss.item()


def test_estep_tokens_scores_the_responsibilities_on_a_prefix():
    model = make_model(K=3).train()
    batch = make_batch()
    out = em_step(ExpertScorer(model, estep_tokens=4), batch, Method.parse("hMoEup"))
    with torch.no_grad():
        ll = model.expert_log_likelihoods(batch.tokens[:, :4], batch.lengths.clamp(max=4))
    torch.testing.assert_close(out.responsibilities, ll.softmax(-1))
    # the M-step still scores whole chunks
    z = out.responsibilities.argmax(-1)
    full = model.log_likelihood(batch.tokens, batch.lengths, z)
    torch.testing.assert_close(out.nll, -full.detach().sum(), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="estep_tokens"):
        ExpertScorer(model, estep_tokens=0)


def test_estep_dtype_casts_only_the_estep():
    model = make_model(K=3).eval()
    batch = make_batch()
    out = em_step(ExpertScorer(model, estep_dtype=torch.bfloat16), batch, Method.parse("hMoEup"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.expert_log_likelihoods(batch.tokens, batch.lengths)
    torch.testing.assert_close(out.responsibilities, low.float().softmax(-1))
    with torch.no_grad():
        exact = model.expert_log_likelihoods(batch.tokens, batch.lengths).softmax(-1)
    torch.testing.assert_close(out.responsibilities, exact, atol=0.05, rtol=0)
    # the M-step scores the chosen experts in float32
    z = out.responsibilities.argmax(-1)
    full = model.log_likelihood(batch.tokens, batch.lengths, z)
    torch.testing.assert_close(out.nll, -full.detach().sum(), atol=1e-4, rtol=1e-5)
    assert out.loss.dtype == torch.float32 and out.loss.requires_grad
    with pytest.raises(ValueError, match="estep_dtype"):
        ExpertScorer(model, estep_dtype=torch.float64)
    with pytest.raises(ValueError, match="reuse_estep needs"):
        ExpertScorer(model, estep_dtype=torch.bfloat16, reuse_estep=True)


def test_estep_dtype_flag_is_checked_and_reaches_training(tiny_bin, tmp_path):
    from moelab.train import TrainConfig, train

    with pytest.raises(ValueError, match="--estep-dtype must be bfloat16 or float16"):
        TrainConfig(max_update=1, estep_dtype="int8")
    result = train(str(tiny_bin), method="hMoEup", num_experts=2, arch="tiny", max_update=2,
                   tokens_per_sample=32, max_tokens=256, estep_dtype="bfloat16",
                   save_dir=str(tmp_path), device="cpu", progress_bar=False)
    assert result.num_updates == 2 and result.config.train.estep_torch_dtype == torch.bfloat16


# ----------------------------------------------------------------------------- compile fallback


def test_compile_falls_back_cleanly_when_torch_compile_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    model = make_model(K=3).eval()
    batch = make_batch()
    expected = model.expert_log_likelihoods(batch.tokens, batch.lengths)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert model.compile_for_speed() is False
    torch.testing.assert_close(model.expert_log_likelihoods(batch.tokens, batch.lengths),
                               expected)


def test_compile_falls_back_when_the_compiled_call_raises(monkeypatch):
    calls = []

    def lazy_failure(fn, **kwargs):  # torch.compile fails on the first call, as inductor does
        def compiled(*args, **kw):
            calls.append(fn)
            raise RuntimeError("inductor failed")
        return compiled

    monkeypatch.setattr(torch, "compile", lazy_failure)
    model = make_model(K=3).train()
    batch = make_batch()
    reference = make_model(K=3).train()
    assert model.compile_for_speed() is True  # nothing known to be wrong yet
    with pytest.warns(RuntimeWarning, match="inductor failed"):
        out = em_step(ExpertScorer(model), batch, Method.parse("sMoEup"))
    expected = em_step(ExpertScorer(reference), batch, Method.parse("sMoEup"))
    torch.testing.assert_close(out.loss, expected.loss)
    n = len(calls)
    em_step(ExpertScorer(model), batch, Method.parse("sMoEup"))  # eager from now on: no retry
    assert len(calls) == n and n >= 1


def test_scoring_functions_are_swapped_through_the_public_api():
    """What compile_for_speed and the bench swap: the body and kernels every score goes
    through, set by use_scoring / scoring_with and restored after the block, even on error."""
    model = make_model(K=3).eval()
    batch = make_batch()
    eager = model.scoring
    expected = model.expert_log_likelihoods(batch.tokens, batch.lengths)
    calls = []

    def manual(ids):
        calls.append(tuple(ids.shape))
        return reference.reference_hidden(model.transformer, ids)

    with model.scoring_with(ScoringFunctions(manual)):
        got = model.expert_log_likelihoods(batch.tokens, batch.lengths)
    assert calls == [(12, 10)]  # one batched forward of B * K rows
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.scoring == eager
    with pytest.raises(RuntimeError, match="boom"), model.scoring_with(ScoringFunctions(manual)):
        raise RuntimeError("boom")
    assert model.scoring == eager
    model.use_scoring(ScoringFunctions(manual))
    assert model.scoring.body is manual
    model.use_scoring(None)
    assert model.scoring == eager


def test_model_without_dropout_reports_dropout_free():
    base = dict(vocab_size=V, num_experts=2, n_layer=1, n_embd=8, n_head=2, ffn_dim=8,
                max_seq_len=8)
    assert MixtureLM(ModelConfig(**base, dropout=0.0)).dropout_free
    assert not MixtureLM(ModelConfig(**base, dropout=0.1)).dropout_free
    assert not MixtureLM(ModelConfig(**base, dropout=0.0, gating=True,
                                     gating_dropout=0.2)).dropout_free


# ------------------------------------------------------------------ where speed work lives

PACKAGE = Path(moelab.__file__).parent


def _modules(*names: str) -> list[Path]:
    paths = []
    for name in names:
        path = PACKAGE / name
        paths += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return paths


def _private_assignments(source: str) -> list[str]:
    """`x._name = ...`, `x._name += ...` and `setattr(x, "_name", ...)` where x is not self/cls:
    code that sets another object's private attribute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for t in ast.walk(target):
                if (isinstance(t, ast.Attribute) and t.attr.startswith("_")
                        and not t.attr.startswith("__")
                        and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls"))):
                    found.append(f"line {t.lineno}: {ast.unparse(t)} = ...")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "setattr" and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("_")
                and not (isinstance(node.args[0], ast.Name)
                         and node.args[0].id in ("self", "cls"))):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_private_attribute_check_finds_what_it_looks_for():
    assert _private_assignments("model._scoring = None") == ["line 1: model._scoring = ..."]
    assert _private_assignments("a.b._c += 1\nsetattr(m, '_x', 1)") == [
        "line 1: a.b._c = ...", "line 2: setattr(m, '_x', 1)"]
    assert _private_assignments("self._x = 1\ncls._y = 2\nx.y = 3\nobj.__dict__ = {}") == []


def test_no_code_in_moelab_sets_another_objects_private_attributes():
    """A class's private attributes are its own: others use its public methods
    (e.g. MixtureLM.use_scoring / scoring_with, not model._scoring = ...)."""
    found = {str(path.relative_to(PACKAGE)): hits for path in _modules(".")
             if (hits := _private_assignments(path.read_text(encoding="utf-8")))}
    assert not found, found


def _imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_core_never_imports_the_bench():
    """Speed work (the reference step, the ablations) stays outside the path training,
    evaluation and generation take."""
    core = _modules("train", "model", "eval", "clustering.py", "generate.py")
    assert len(core) > 10
    found = {str(path.relative_to(PACKAGE)): sorted(bench_imports)
             for path in core
             if (bench_imports := {n for n in _imports(path.read_text(encoding="utf-8"))
                                   if n == "moelab.bench" or n.startswith("moelab.bench.")})}
    assert not found, found
    assert "moelab.bench.runner" in _imports("from moelab.bench import runner")
