"""Adaptive expert skipping: exactness at gamma 0, real work removed, gammas through export and reload."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fit_args
from torch.overrides import TorchFunctionMode

from benchmarks.skip_overhead import OpCounter
from diep_lightning import load_pruned
from diep_lightning.callbacks import GlobalExpertPruning, SkipCalibration
from diep_lightning.families import get_family
from diep_lightning.main import main
from diep_lightning.skipping import calibrate_skipping, install_skipping
from diep_lightning.testing import TINY_CONFIGS, tiny_model

TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_gamma_zero_reproduces_unskipped_logits(model_type):
    model = tiny_model(model_type)
    reference = _logits(model)
    blocks = get_family(model).blocks(model)
    hooks = install_skipping(model, {b.index: torch.zeros(b.num_experts, b.num_experts) for b in blocks}, count=True)
    assert torch.equal(_logits(model), reference)
    assert all(skipped == 0 for skipped, _ in hooks.stats.values())


class _RowCounter(TorchFunctionMode):
    """Counts rows pushed through F.linear with a given weight shape (an expert's gate_up projection)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.rows = tuple(shape), 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear and tuple(args[1].shape) == self.shape:
            self.rows += args[0].shape[0]
        return func(*args, **(kwargs or {}))


def test_skipped_experts_are_not_computed():
    model = tiny_model("mixtral", experts_implementation="eager")
    family = get_family(model)
    blocks = family.blocks(model)
    shape = blocks[0].experts.gate_up_proj.shape[1:]
    with _RowCounter(shape) as full:
        reference = _logits(model)
    tokens = TOKENS.numel()
    assert full.rows == 2 * tokens * len(blocks)  # top-2 in every layer
    hooks = install_skipping(model, {b.index: torch.full((8, 8), 1e9) for b in blocks}, count=True)
    with _RowCounter(shape) as skipped:
        out = _logits(model)
    assert skipped.rows == tokens * len(blocks), "only each token's top expert may run"
    assert all(s == tokens for s, _ in hooks.stats.values())
    assert not torch.equal(out, reference)


def test_partial_skipping_only_drops_small_weights():
    model = tiny_model("qwen3_moe")
    blocks = get_family(model).blocks(model)
    hooks = install_skipping(model, {b.index: torch.full((8, 8), 0.5) for b in blocks}, count=True)
    _logits(model)
    fractions = [s / t for s, t in hooks.stats.values()]
    assert all(0.0 < f < 0.5 for f in fractions), fractions


def test_gammas_survive_export_and_reload(tiny_mixtral_dir, tmp_path):
    export = tmp_path / "export"
    cli = main(fit_args(tiny_mixtral_dir, str(tmp_path), "--trainer.callbacks+=GlobalExpertPruning",
                        "--trainer.callbacks.sparsity=0.25", f"--trainer.callbacks.export_dir={export}",
                        "--trainer.callbacks+=SkipCalibration", epochs=1))
    pruning = next(c for c in cli.trainer.callbacks if isinstance(c, GlobalExpertPruning))
    skip = next(c for c in cli.trainer.callbacks if isinstance(c, SkipCalibration))
    record = json.loads((export / "pruning.json").read_text())
    gammas = record["plan"]["skipping"]["gammas"]
    assert {int(k) for k in gammas} == {0, 1}
    for k, rows in gammas.items():
        assert len(rows) == len(record["layers"][int(k)]["kept"])  # calibrated on the survivors
    assert all(0.0 <= f <= 0.5 for f in skip.skipped_fraction.values())
    tokens = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(3))
    loaded = load_pruned(export)
    assert hasattr(loaded, "diep_skipping")
    torch.testing.assert_close(_logits(loaded, tokens), _logits(pruning.pruned_model, tokens), atol=1e-6, rtol=0)
    plain = load_pruned(export, skipping=False)
    assert not hasattr(plain, "diep_skipping")


def test_skipping_refuses_top1_routing():
    model = tiny_model("mixtral", num_experts_per_tok=1)
    blocks = get_family(model).blocks(model)
    with pytest.raises(ValueError, match="top-k >= 2"):
        install_skipping(model, {b.index: torch.zeros(8, 8) for b in blocks})


def test_single_token_drops_skipped_slots_and_matches_batched_path():
    """Batch-1 decoding routes the token to its kept experts only, with the same result as the sentinel path."""
    model = tiny_model("mixtral", experts_implementation="eager")
    blocks = get_family(model).blocks(model)
    shape = blocks[0].experts.gate_up_proj.shape[1:]
    install_skipping(model, {b.index: torch.full((8, 8), 1e9) for b in blocks})
    token = TOKENS[:1, :1]
    with _RowCounter(shape) as counter:
        single = _logits(model, token)
    assert counter.rows == len(blocks)
    batched = _logits(model, token.expand(2, 1).contiguous())
    torch.testing.assert_close(single[0], batched[0], rtol=1e-5, atol=1e-5)


class _TopOnly:
    """Reference for skipping every non-top slot: the same routing with those slots' weights set to 0."""

    def __init__(self, blocks):
        self.handles = [b.experts.register_forward_pre_hook(self.hook) for b in blocks]

    @staticmethod
    def hook(module, args):
        idx, w = args[1], args[2]
        keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.argmax(-1, keepdim=True), True)
        return (args[0], idx, w.masked_fill(~keep, 0.0), *args[3:])


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_skipping_every_other_slot_equals_top_expert_only(model_type, implementation):
    """Every family and experts kernel leaves the skipped (sentinel) slots out and computes the rest exactly."""
    model = tiny_model(model_type, experts_implementation=implementation)
    blocks = get_family(model).blocks(model)
    reference_hooks = _TopOnly(blocks)
    reference = _logits(model)
    for handle in reference_hooks.handles:
        handle.remove()
    skipping = install_skipping(model, {b.index: torch.full((8, 8), 1e9) for b in blocks}, count=True)
    torch.testing.assert_close(_logits(model), reference, rtol=1e-5, atol=1e-5)
    top_k = blocks[0].top_k
    assert all(s * top_k == t * (top_k - 1) for s, t in skipping.stats.values())
    skipping.remove()
    assert not any(hasattr(b.experts, "diep_skip") for b in blocks)


def test_remote_code_loading_reinstalls_the_recorded_skipping(tmp_path):
    """A non-uniform export loaded with stock transformers + trust_remote_code skips like load_pruned does."""
    from transformers import AutoModelForCausalLM

    from diep_lightning.export import export_pruned
    from diep_lightning.removal import apply_plan, size_report
    from diep_lightning.pruning import SkipRecord, select_experts

    model = tiny_model("mixtral")
    blocks = get_family(model).blocks(model)
    plan = select_experts([torch.arange(8.0) * (1 + 3 * b.index) for b in blocks], 0.375, [2, 2], "global")
    assert len({len(k) for k in plan.kept}) > 1, "the plan must be non-uniform"
    sizes = size_report(model)
    apply_plan(model, plan)
    plan.skipping = SkipRecord(gammas={b.index: torch.full((b.num_experts,) * 2, 0.5).tolist() for b in blocks})
    export, _ = export_pruned(model, plan, tmp_path / "export", source="tiny", original=sizes)
    tokens = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    remote = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    assert hasattr(remote, "diep_skipping")
    torch.testing.assert_close(_logits(remote, tokens), _logits(load_pruned(export), tokens), atol=1e-6, rtol=0)
    assert not torch.equal(_logits(remote, tokens), _logits(load_pruned(export, skipping=False), tokens))


def test_strength_scales_the_thresholds_and_skips_more():
    batches = [{"input_ids": torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(5))}]
    shares = {}
    for strength in (1.0, 2.5):
        model = tiny_model("qwen3_moe")
        skipping = calibrate_skipping(model, batches, strength=strength)
        shares[strength] = sum(skipping.skipped_fraction.values()) / len(skipping.skipped_fraction)
        if strength == 1.0:
            base = skipping.gammas
        else:
            for i, gamma in skipping.gammas.items():
                torch.testing.assert_close(gamma, strength * base[i])
            assert skipping.record().to_dict()["strength"] == strength
    assert shares[2.5] > shares[1.0] > 0



def test_share_finds_the_strength_that_skips_it():
    batches = [{"input_ids": torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(6))}]
    model = tiny_model("mixtral")
    skipping = calibrate_skipping(model, batches, share=0.4)
    reached = sum(skipping.skipped_fraction.values()) / len(skipping.skipped_fraction)
    assert abs(reached - 0.4) < 0.03 and skipping.strength > 0
    # the installed thresholds are the ones recorded, and they skip that share again
    skipping.hooks.counting = True
    with torch.no_grad():
        model(**batches[0])
    stats = skipping.hooks.stats
    assert abs(sum(s for s, _ in stats.values()) / sum(t for _, t in stats.values()) - reached) < 1e-6
    with pytest.raises(ValueError, match="share: 0.6 is more than skipping can skip"):
        calibrate_skipping(tiny_model("mixtral"), batches, share=0.6)  # top-2: half the slots at most


def _logits_and_ops(model, tokens=TOKENS):
    with torch.no_grad(), OpCounter() as counter:
        logits = model(tokens).logits
    return logits, counter.ops


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_grouped_mm_skipping_equals_the_sentinel_path_with_fewer_kernels(model_type, dtype, renormalize):
    """The lean grouped_mm forward gives the stock sentinel path's output bit for bit, and adds at most half the
    operations that path adds per MoE layer over unskipped decoding (launches are what a GPU decode step pays)."""
    model = tiny_model(model_type).to(dtype)
    assert model.config._experts_implementation == "grouped_mm"
    blocks = get_family(model).blocks(model)
    gammas = {b.index: 2 * torch.rand(b.num_experts, b.num_experts, generator=torch.Generator().manual_seed(b.index))
              for b in blocks}
    skipping = install_skipping(model, gammas, renormalize=renormalize, count=True)
    _logits(model)
    stats = skipping.stats
    assert 0 < sum(s for s, _ in stats.values()) < sum(t for _, t in stats.values()), stats  # some skipped, not all
    skipping.counting = False
    lean, lean_ops = _logits_and_ops(model)
    skipping.lean = False  # the stock experts forward with sentinel ids
    stock, stock_ops = _logits_and_ops(model)
    skipping.lean = True
    assert torch.equal(lean, stock)
    with skipping.disabled():
        plain, plain_ops = _logits_and_ops(model)
    assert not torch.equal(lean, plain)
    if not renormalize:  # rescaling the survivors costs the same operations on either path
        assert (lean_ops - plain_ops) * 2 <= stock_ops - plain_ops, (lean_ops, stock_ops, plain_ops)


def test_skipping_with_autograd_keeps_the_stock_forward():
    """With gradients on, the sentinel rows the lean forward leaves uninitialised would reach the gradient: the
    stock experts forward (which masks them) serves those calls, with the same output."""
    model = tiny_model("mixtral")
    blocks = get_family(model).blocks(model)
    install_skipping(model, {b.index: torch.full((8, 8), 0.5) for b in blocks})
    inference = _logits(model)
    trained = model(TOKENS).logits
    trained.sum().backward()
    torch.testing.assert_close(trained.detach(), inference, rtol=1e-6, atol=1e-6)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_skipping_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) takes a model with skipping installed (the route around a GPU's per-kernel launch
    cost in eager decoding), computes what eager skipping computes, and follows the on/off switch."""
    model = tiny_model("mixtral")
    blocks = get_family(model).blocks(model)
    skipping = install_skipping(model, {b.index: torch.full((8, 8), 0.5) for b in blocks})
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager_on = model(TOKENS).logits
        torch.testing.assert_close(compiled(TOKENS).logits, eager_on, rtol=1e-4, atol=1e-4)
        with skipping.disabled():
            eager_off = model(TOKENS).logits
            torch.testing.assert_close(compiled(TOKENS).logits, eager_off, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eager_on, eager_off, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("experts, tokens, hidden", [(8, 64, 48), (6, 200, 16)])
def test_the_cka_matrix_equals_pairwise_cka_in_either_form(experts, tokens, hidden):
    """The token-Gram form (few tokens for the features: 64 < 8 * 48 / 2) and the feature form (200 > 6 * 16 / 2)
    both give each pair's linear CKA; an affine copy scores 1, constant outputs 0."""
    from diep_lightning.calibration import cka_matrix, linear_cka

    torch.manual_seed(0)
    outputs = torch.randn(experts, tokens, hidden) + 2 * torch.randn(1, tokens, hidden)  # correlated experts
    outputs[1] = 3 * outputs[0] + 1
    outputs[4] = 0.5
    cka = cka_matrix(outputs)
    pairwise = torch.tensor([[1.0 if i == j else linear_cka(outputs[i], outputs[j]) for j in range(experts)]
                             for i in range(experts)])
    torch.testing.assert_close(cka, pairwise, atol=1e-6, rtol=0)
    banded = cka_matrix(outputs, block_bytes=4 * experts * tokens * 7)  # 7 rows of every Gram at a time
    torch.testing.assert_close(banded, pairwise, atol=1e-6, rtol=0)
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-6) and float(cka[4, 0]) == 0.0
    assert 0.1 < float(cka[2, 3]) < 0.99  # the shared component: neither unrelated nor identical
