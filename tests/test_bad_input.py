"""Every bad input fails through the real CLI with exit code 2 and one line naming the argument, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from model_fixtures import fit_args, tiny_mixtral_dir  # noqa: F401
from transformers import AutoConfig

from diep_lightning.main import main
from diep_lightning.testing import save_tiny_model


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny_tokenizer):
    """Files and model directories that are wrong in one way each."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.jsonl").write_text("")
    (root / "notext.jsonl").write_text(json.dumps({"body": "some words here"}) + "\n")
    (root / "afile").write_text("x")
    AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64).save_pretrained(root / "dense")
    AutoConfig.for_model("jamba", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_experts=4,
                         intermediate_size=64).save_pretrained(root / "jamba")
    save_tiny_model("mixtral", str(root / "top1"), tiny_tokenizer, num_experts_per_tok=1)
    nan_dir = save_tiny_model("mixtral", str(root / "nan"), tiny_tokenizer)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nan_dir)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    model.save_pretrained(nan_dir)
    (root / "taken").mkdir()
    return root


PRUNE = ["--trainer.callbacks+=GlobalExpertPruning"]

# (id, model dir key or None for the tiny Mixtral, extra CLI args, the argument the one line must start with)
CASES = [
    ("sparsity_zero", None, [*PRUNE, "--trainer.callbacks.sparsity=0"], "sparsity:"),
    ("sparsity_one", None, [*PRUNE, "--trainer.callbacks.sparsity=1.0"], "sparsity:"),
    ("sparsity_negative", None, [*PRUNE, "--trainer.callbacks.sparsity=-0.2"], "sparsity:"),
    ("uniform_below_top_k", None, [*PRUNE, "--trainer.callbacks.sparsity=0.9", "--trainer.callbacks.mode=uniform"],
     "sparsity:"),
    ("global_below_top_k", None, [*PRUNE, "--trainer.callbacks.sparsity=0.95"], "sparsity:"),
    ("bad_mode", None, [*PRUNE, "--trainer.callbacks.mode=layerwise"], "layerwise"),
    ("unknown_model_type", "jamba", [], "model: unsupported MoE model_type 'jamba'"),
    ("dense_model", "dense", [], "model: model_type 'llama' is a dense model"),
    ("missing_model", "missing", [], "model_name_or_path:"),
    ("calibration_missing", None, ["--data.sources=/nonexistent/calib.jsonl"], "sources"),
    ("calibration_empty", None, ["--data.sources={root}/empty.jsonl"], "sources"),
    ("calibration_no_text", None, ["--data.sources={root}/notext.jsonl"], "text_field"),
    ("too_few_tokens", None, ["--data.num_samples=100000"], "num_samples"),
    ("batch_size_zero", None, ["--data.batch_size=0"], "batch_size"),
    ("seq_len_zero", None, ["--data.seq_len=0"], "seq_len"),
    ("ratio_malformed", None, ["--model.alpha_beta_ratio=3-1"], "alpha_beta_ratio:"),
    ("ratio_zero", None, ["--model.alpha_beta_ratio=0:0"], "alpha_beta_ratio:"),
    ("negative_lambda", None, ["--model.lam=-1"], "lam:"),
    ("unknown_method", None, ["--model.method=magic"], "model.method"),
    ("unknown_callback_argument", None, [*PRUNE, "--trainer.callbacks.sparsityy=0.5"], "sparsityy"),
    ("export_dir_exists", None, [*PRUNE, "--trainer.callbacks.export_dir={root}/taken"], "export_dir:"),
    ("export_dir_not_writable", None, [*PRUNE, "--trainer.callbacks.export_dir={root}/afile/out"], "export_dir:"),
    ("lm_eval_task_unknown", None, ["--trainer.callbacks+=LmEvalValidation", "--trainer.callbacks.tasks=[kit_piqaa]"],
     "tasks: unknown task 'kit_piqaa'"),
    ("nan_loss", "nan", [], "loss: non-finite loss"),
    ("skipping_top1", "top1", ["--trainer.callbacks+=SkipCalibration"], "SkipCalibration: skipping needs top-k >= 2"),
    ("merging_nothing_pruned", None, ["--trainer.callbacks+=ExpertMerging"], "ExpertMerging: nothing is pruned"),
    ("naee_global_mode", None, ["--model.method=naee", *PRUNE], "mode: NAEE"),
]


@pytest.mark.parametrize("name,model_key,extra,starts", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(name, model_key, extra, starts, bad_inputs, tiny_mixtral_dir, tmp_path,
                                     capsys):
    model_dir = tiny_mixtral_dir if model_key is None else str(bad_inputs / model_key)
    args = fit_args(model_dir, str(tmp_path / "run"), *[a.format(root=bad_inputs) for a in extra], epochs=1)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    assert last[len("error: "):].startswith(starts) or starts in last, last
    if name not in ("nan_loss",):
        assert not list((tmp_path / "run").glob("**/*.ckpt")), "no search may run after bad input"


def test_nan_loss_keeps_the_last_good_scores(bad_inputs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(str(bad_inputs / "nan"), str(tmp_path), epochs=1))
    assert "at step 0" in capsys.readouterr().err
    saved = list(tmp_path.glob("**/last_good_scores.pt"))
    assert len(saved) == 1
    state = torch.load(saved[0], weights_only=False)
    assert state["step"] == 0 and set(state["state_dict"]) == {"alpha_logits.0", "alpha_logits.1", "beta.0", "beta.1"}


def test_the_real_entry_point_prints_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diep_lightning", "fit",
                             f"--model.model_name_or_path={tmp_path / 'nope'}"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model_name_or_path:")
