"""vLLM serves non-uniform exports through the plugin, with the same greedy tokens as transformers.

Needs vLLM: run with the Python of the venv that ``bash tools/install_vllm_cpu.sh`` makes::

    VLLM_CPU_KVCACHE_SPACE=1 /opt/vllm-venv/bin/python -m pytest -m vllm tests/test_vllm.py

The shipped tiny-mixtral is served as it is, uniformly pruned and globally pruned. vLLM's CPU attention supports
head sizes 32, 64, 80, ... only, so stock vLLM cannot run tiny-qwen-moe (head size 40) on a CPU; its global export
is served by the plugin with the heads zero-padded to 64. Each served family is also checked on a random model
with head size 32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.serving import prompt_ids, run_child
from diep_lightning.export import export_pruned
from diep_lightning.families import get_family
from diep_lightning.loading import load_model, load_tokenizer
from diep_lightning.pipeline import prune
from diep_lightning.testing import tiny_model

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parents[1]
TOKENIZER = str(REPO / "models" / "tiny-mixtral")
#: random models vLLM's CPU attention accepts (head size 32), with the shipped tokenizer's vocabulary
CPU_SHAPE = dict(vocab_size=8192, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512)
FAMILIES = {"qwen2_moe": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                              shared_expert_intermediate_size=128),
            "qwen3_moe": dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, head_dim=32),
            "olmoe": dict(num_experts=16, num_experts_per_tok=4, intermediate_size=64),
            "mixtral": dict(intermediate_size=256)}


def _export(model: torch.nn.Module, source: str, target: Path, mode: str, skip_strength: float | None = None) -> Path:
    """A 50% export; with ``skip_strength``, skipping calibrated on random tokens at that strength is recorded."""
    blocks = get_family(model).blocks(model)
    scores = [torch.arange(b.num_experts, dtype=torch.float32).roll(b.index) * (1 + 2 * b.index) for b in blocks]
    skipping = {}
    if skip_strength is not None:
        ids = torch.randint(3, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
        skipping = dict(skip=True, skip_strength=skip_strength,
                        batches=[{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    pruned = prune(model, scores, 0.5, mode, **skipping)
    path, _ = export_pruned(pruned.model, pruned.plan, target, source=source, original=pruned.before,
                            tokenizer=load_tokenizer(TOKENIZER))
    if mode == "global":
        counts = json.loads((path / "config.json").read_text())["num_experts_per_layer"]
        assert len(set(counts)) > 1, counts
    return path


def _same_greedy_tokens(path: str, overrides: dict | None = None) -> list[list[int]]:
    prompts = prompt_ids(TOKENIZER, 3)
    reference = run_child(path, prompts, 20, "transformers", overrides)
    served = run_child(path, prompts, 20, "vllm", overrides)
    assert "error" not in reference, reference
    assert "error" not in served, served
    assert served["tokens"] == reference["tokens"]
    assert all(len(t) == 20 for t in served["tokens"])
    return served["tokens"]


@pytest.mark.parametrize("mode", ["original", "uniform", "global"])
def test_the_shipped_tiny_mixtral_serves_with_transformers_tokens(mode, tmp_path):
    pytest.importorskip("vllm")
    model_dir = str(REPO / "models" / "tiny-mixtral")
    _same_greedy_tokens(model_dir if mode == "original" else str(_export(load_model(model_dir), model_dir,
                                                                         tmp_path / mode, mode)))


def test_the_shipped_tiny_qwen_moe_global_export_serves_with_padded_heads(tmp_path):
    pytest.importorskip("vllm")
    model_dir = str(REPO / "models" / "tiny-qwen-moe")
    _same_greedy_tokens(str(_export(load_model(model_dir), model_dir, tmp_path / "global", "global")))


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_served_family_serves_a_global_export_with_transformers_tokens(model_type, tmp_path):
    pytest.importorskip("vllm")
    model = tiny_model(model_type, num_hidden_layers=3, **CPU_SHAPE, **FAMILIES[model_type])
    _same_greedy_tokens(str(_export(model, f"random {model_type}", tmp_path / "global", "global")))


def test_recorded_skipping_serves_with_transformers_tokens_and_switches_off(tmp_path):
    """vLLM applies the export's skipping (same tokens as transformers with it), and ``diep_skipping: False`` turns it
    off (same tokens as transformers without it); the two differ, so skipping really acts in vLLM."""
    pytest.importorskip("vllm")
    model_dir = str(REPO / "models" / "tiny-mixtral")
    path = str(_export(load_model(model_dir), model_dir, tmp_path / "global", "global", skip_strength=3.0))
    assert json.loads((Path(path) / "pruning.json").read_text())["plan"]["skipping"]["gammas"]
    skipping = _same_greedy_tokens(path)
    stock = _same_greedy_tokens(path, {"diep_skipping": False})
    assert skipping != stock


def test_a_uniform_export_serves_its_skipping_through_the_plugins_architecture(tmp_path):
    pytest.importorskip("vllm")
    model_dir = str(REPO / "models" / "tiny-mixtral")
    path = str(_export(load_model(model_dir), model_dir, tmp_path / "uniform", "uniform", skip_strength=3.0))
    skipping = _same_greedy_tokens(path, {"architectures": ["DiEPMixtralForCausalLM"]})
    assert skipping != _same_greedy_tokens(path, {"diep_skipping": False})  # stock vLLM: no skipping


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_served_family_serves_recorded_skipping_with_transformers_tokens(model_type, tmp_path):
    pytest.importorskip("vllm")
    model = tiny_model(model_type, num_hidden_layers=3, **CPU_SHAPE, **FAMILIES[model_type])
    _same_greedy_tokens(str(_export(model, f"random {model_type}", tmp_path / "global", "global", skip_strength=1.5)))


def test_the_serving_speed_benchmark_times_skipping_on_and_off_in_one_engine(tmp_path):
    pytest.importorskip("vllm")
    from benchmarks import serving_speed

    results = serving_speed.main(["--shapes", "mixtral", "--hidden", "256", "--layers", "2", "--repeats", "1",
                                  "--engine-rounds", "2",
                                  "--new-tokens", "4", "--prefill-tokens", "64", "--out", str(tmp_path),
                                  "--results", str(tmp_path / "RESULTS.md")])
    full, pruned = results["shapes"]["mixtral"]["full"], results["shapes"]["mixtral"]["pruned_50"]
    assert "error" not in full and "error" not in pruned, (full.get("error"), pruned.get("error"))
    assert (full["experts"], pruned["experts"]) == (8, 4) and full["layers"] == [0, 1]
    assert 0 < full["served_share"] < 1
    assert full["experts_read"]["decode_1"] < 1  # at batch 1 a skipped slot is an expert not read
    assert set(pruned["summary"]) == {"skip_vs_off", "off_vs_full", "skip_vs_full"}
    assert all(len(v) == 2 for v in full["times"]["on"].values()) and len(full["profiles"]) == 2  # both engines
    assert all(0 < p["on"]["decode_1"]["moe_s"] < p["on"]["decode_1"]["total_s"] for p in full["profiles"])
    assert "| mixtral | pruned_50 | 4 |" in (tmp_path / "RESULTS.md").read_text()


def test_the_openai_server_serves_an_export_with_transformers_tokens(tmp_path):
    """The README's CPU serving command as written (the vLLM venv's Python, ``-m vllm.entrypoints.openai.api_server``
    on 127.0.0.1), one request through the ``openai`` client, the same greedy text as transformers."""
    pytest.importorskip("vllm")
    openai = pytest.importorskip("openai")
    import socket
    import subprocess
    import sys
    import time

    from transformers import AutoTokenizer

    model_dir = str(REPO / "models" / "tiny-mixtral")
    path = str(_export(load_model(model_dir), model_dir, tmp_path / "global", "global"))
    prompts = prompt_ids(TOKENIZER, 1)
    reference = run_child(path, prompts, 12, "transformers")
    assert "error" not in reference, reference
    expected = AutoTokenizer.from_pretrained(path).decode(reference["tokens"][0])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
                               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256",
                               "--dtype", "float32"], stdout=log, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "the server did not come up in 10 minutes"
                time.sleep(2)
        answer = client.completions.create(model=path, prompt=prompts[0], max_tokens=12, temperature=0.0,
                                           extra_body={"min_tokens": 12, "ignore_eos": True})
        assert answer.choices[0].text == expected
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_an_edited_or_damaged_export_is_refused_naming_the_field_or_file(tmp_path):
    """vLLM builds layers from num_experts_per_layer: an edit to it alone, or a truncated pruning.json, ends in a last
    line that names the field or the file instead of vLLM's shape assertion or a raw JSONDecodeError."""
    path = _export(tiny_model("mixtral", **CPU_SHAPE, **FAMILIES["mixtral"]), "tiny", tmp_path / "edited", "global")
    config = json.loads((path / "config.json").read_text())
    config["num_experts_per_layer"] = [c + 1 for c in config["num_experts_per_layer"]]
    (path / "config.json").write_text(json.dumps(config))
    prompts = prompt_ids(TOKENIZER, 1)
    assert "num_experts_per_layer: config.json of" in run_child(str(path), prompts, 4, "vllm")["error"]
    path = _export(tiny_model("mixtral", **CPU_SHAPE, **FAMILIES["mixtral"]), "tiny", tmp_path / "cut", "global")
    record = path / "pruning.json"
    record.write_text(record.read_text()[:200])
    assert "pruning.json is not valid JSON" in run_child(str(path), prompts, 4, "vllm")["error"]
    path = _export(tiny_model("phimoe", vocab_size=8192, max_position_embeddings=512), "tiny", tmp_path / "phimoe", "global")
    assert "architectures: diep_lightning's vLLM plugin serves" in run_child(str(path), prompts, 4, "vllm")["error"]


def test_the_openai_server_refuses_a_bad_export_with_one_line_and_no_traceback(tmp_path):
    """The plugin refuses while vLLM makes its config, before an engine process starts, so the server's output
    ends in the one line and holds no traceback (vLLM's own log lines above it stay): an edited per-layer count and
    a weight file cut short."""
    import subprocess
    import sys

    edited = _export(tiny_model("mixtral", **CPU_SHAPE, **FAMILIES["mixtral"]), "tiny", tmp_path / "edited", "global")
    config = json.loads((edited / "config.json").read_text())
    config["num_experts_per_layer"] = [c + 1 for c in config["num_experts_per_layer"]]
    (edited / "config.json").write_text(json.dumps(config))
    cut = _export(tiny_model("mixtral", **CPU_SHAPE, **FAMILIES["mixtral"]), "tiny", tmp_path / "cut", "global")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:-4096])
    for path, line in ((edited, "error: num_experts_per_layer: config.json of "),
                       (cut, "error: model.safetensors: ")):
        done = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                               "--host", "127.0.0.1", "--port", "0"], capture_output=True, text=True, timeout=600)
        output = done.stdout + done.stderr
        assert done.returncode != 0
        assert "Traceback" not in output, output[-3000:]
        assert done.stderr.strip().splitlines()[-1].startswith(line), output[-1000:]
