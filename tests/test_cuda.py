"""The CUDA paths, on a machine with a GPU: ``python -m pytest -m cuda`` (CI has none, so they are deselected there).

Skipping is exact and adds no host synchronisation on the device, in fp32 and bf16, for every family; the DiEP
search, pruning, skipping calibration and export run through the real CLI on the GPU with bf16 weights, and the
export loads back onto the GPU with its skipping.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import fit_args
from test_skipping import _TopOnly

from diep_lightning import load_pruned
from diep_lightning.families import get_family
from diep_lightning.main import main
from diep_lightning.skipping import install_skipping
from diep_lightning.testing import TINY_CONFIGS, tiny_model

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
#: bf16 keeps 8 bits of mantissa: the same sums in another order differ by about 2^-8 relative
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def _gpu():
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need a GPU (run them with -m cuda on a machine that has one)")


def _logits(model):
    with torch.no_grad():
        return model(TOKENS.to(CUDA)).logits.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_skipping_is_exact_on_the_gpu(model_type, dtype):
    """gamma 0 changes nothing; skipping every non-top slot equals computing the top expert only."""
    model = tiny_model(model_type, experts_implementation="grouped_mm").to(CUDA, dtype)
    blocks = get_family(model).blocks(model)
    reference = _logits(model)
    zero = install_skipping(model, {b.index: torch.zeros(b.num_experts, b.num_experts) for b in blocks}, count=True)
    assert torch.equal(_logits(model), reference)
    assert all(skipped == 0 for skipped, _ in zero.stats.values())
    zero.remove()
    top_only = _TopOnly(blocks)
    expected = _logits(model)
    for handle in top_only.handles:
        handle.remove()
    skipping = install_skipping(model, {b.index: torch.full((b.num_experts,) * 2, 1e9) for b in blocks}, count=True)
    torch.testing.assert_close(_logits(model), expected, **TOLERANCE[dtype])
    top_k = blocks[0].top_k
    assert all(s * top_k == t * (top_k - 1) for s, t in skipping.stats.values())


def _host_syncs(model) -> int:
    """Host synchronisations one forward pass makes (CUDA's sync debug mode warns at each), after one warm-up pass
    (a decode step is never the first call)."""
    _logits(model)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _logits(model)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_skipping_adds_no_host_synchronisation(model_type):
    model = tiny_model(model_type, experts_implementation="grouped_mm").to(CUDA)
    blocks = get_family(model).blocks(model)
    stock = _host_syncs(model)
    skipping = install_skipping(model, {b.index: torch.full((b.num_experts,) * 2, 0.5) for b in blocks})
    assert _host_syncs(model) == stock
    skipping.counting = True  # statistics are the one thing that may read back, and only when they are read
    assert _host_syncs(model) == stock
    assert sum(s for s, _ in skipping.stats.values()) > 0


def test_search_prune_skip_and_export_run_on_the_gpu_in_bf16(tiny_mixtral_dir, tmp_path):
    export = tmp_path / "export"
    cli = main(fit_args(tiny_mixtral_dir, str(tmp_path), "--trainer.accelerator=gpu", "--model.dtype=bfloat16",
                        "--trainer.callbacks+=GlobalExpertPruning", "--trainer.callbacks.sparsity=0.25",
                        f"--trainer.callbacks.export_dir={export}", "--trainer.callbacks+=SkipCalibration", epochs=1))
    assert cli.trainer.strategy.root_device.type == "cuda"  # Lightning moves the module back to the CPU at the end
    assert all(torch.isfinite(p).all() for n, p in cli.model.named_parameters() if p.requires_grad)
    record = json.loads((export / "pruning.json").read_text())
    assert sum(len(layer["removed"]) for layer in record["layers"]) == 4
    assert record["plan"]["skipping"] is not None
    loaded = load_pruned(export).to(CUDA)
    assert hasattr(loaded, "diep_skipping")
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(1)).to(CUDA)
    out = loaded.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 16) and out.device.type == "cuda"


def test_a_host_memory_teacher_cache_gives_the_same_search_on_the_gpu(tiny_mixtral_dir, tmp_path):
    """The cache kept in host memory reaches the GPU through pinned memory, with the same values as a cache kept on
    the GPU."""
    states = {}
    for where in ("model", "cpu"):
        root = tmp_path / where
        cli = main(fit_args(tiny_mixtral_dir, str(root), "--trainer.accelerator=gpu",
                            f"--model.teacher_cache_device={where}", epochs=2))
        assert len(cli.model._teacher_cache) == 16
        states[where] = cli.model.trainable_state_dict()
    for key, value in states["model"].items():
        torch.testing.assert_close(states["cpu"][key], value, atol=1e-6, rtol=0)
