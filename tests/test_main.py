"""The real CLI: help, print_config, every shipped YAML, and the whole pipeline from a tiny YAML."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import fit_args

from diep_lightning.main import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "diep_lightning", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0
    for sub in ("fit", "validate"):
        assert sub in result.stdout


def test_quiet_silences_dataset_progress_bars_without_importing_datasets():
    """Importing datasets costs about a second; a run that never loads it should not pay that to silence it."""
    code = ("import sys; from diep_lightning.summary import quiet; quiet(); loaded = 'datasets' in sys.modules; "
            "import datasets; print(loaded, datasets.is_progress_bar_enabled())")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_print_config_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.model_name_or_path=some/model", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith(".DiEPModule")  # the default method
    assert printed["model"]["init_args"]["lam"] == 0.01
    assert printed["model"]["init_args"]["alpha_beta_ratio"] == "3:1"
    assert printed["data"]["num_samples"] == 128


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_yaml_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["model_name_or_path"]
    assert "GlobalExpertPruning" in printed["prune"]["class_path"]
    assert not any("GlobalExpertPruning" in str(cb) for cb in printed["trainer"].get("callbacks") or [])


def test_prune_arguments_reach_the_pruning_callback_whatever_else_is_listed(capsys):
    """`--prune.X` is the documented way to change the pruning callback from the command line."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "tiny_mixtral.yaml"), "--trainer.callbacks+=ExpertMerging",
              "--prune.mode=uniform", "--prune.sparsity=0.25", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["prune"]["init_args"]["mode"] == "uniform" and printed["prune"]["init_args"]["sparsity"] == 0.25
    assert [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]] == [
        "LmEvalValidation", "ExpertMerging"]


def test_tiny_yaml_runs_search_prune_and_export(tiny_mixtral_dir, tmp_path):
    config = yaml.safe_load((REPO / "configs" / "tiny_mixtral.yaml").read_text())
    config["model"]["model_name_or_path"] = tiny_mixtral_dir
    config["data"].update(num_samples=16, seq_len=32, batch_size=4)
    config["trainer"].update(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["trainer"]["callbacks"] = []
    config["prune"]["init_args"].update(sparsity=0.25, export_dir=str(tmp_path / "export"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--trainer.callbacks+=ExpertMerging"])
    record = json.loads((tmp_path / "export" / "pruning.json").read_text())
    assert sum(len(layer["removed"]) for layer in record["layers"]) == 4
    assert any(layer["merges"] for layer in record["layers"]), "ExpertMerging added on the command line must run"
    groups = [g for layer in record["layers"] for g in layer["merges"].values()]
    assert all(isinstance(g["merged"], bool) and "error_merged" in g for g in groups)
    assert record["plan"]["merging"]["guard"] is True and record["plan"]["merging"]["weights"] == "usage"
    card = (tmp_path / "export" / "README.md").read_text()
    assert "- Merged: yes" in card


def test_existing_export_dir_fails_before_the_search(tiny_mixtral_dir, tmp_path, capsys):
    existing = tmp_path / "taken"
    existing.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tiny_mixtral_dir, str(tmp_path), "--trainer.callbacks+=GlobalExpertPruning",
                      f"--trainer.callbacks.export_dir={existing}"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: export_dir:") and "overwrite" in err[-1]
    assert not list(tmp_path.glob("**/*.ckpt")), "nothing may run after bad input"


def test_lm_eval_callback_reports_baseline_and_pruned(tiny_mixtral_dir, tmp_path, capsys):
    export = tmp_path / "export"
    main(fit_args(tiny_mixtral_dir, str(tmp_path), "--trainer.callbacks+=GlobalExpertPruning",
                  "--trainer.callbacks.sparsity=0.25", f"--trainer.callbacks.export_dir={export}",
                  "--trainer.callbacks+=LmEvalValidation", "--trainer.callbacks.limit=3",
                  "--trainer.callbacks.tasks=[kit_blimp_causative,kit_wikitext2]", epochs=1))
    summary = json.loads((export / "lm_eval.json").read_text())
    assert set(summary["baseline"]) == set(summary["pruned"]) and "kit_wikitext2/word_perplexity" in summary["pruned"]
    assert 0.0 <= summary["pruned"]["kit_blimp_causative/acc"] <= 1.0
    out = capsys.readouterr().out
    assert "lm-eval baseline" in out and "lm-eval pruned" in out


def test_unknown_lm_eval_task_fails_in_one_line(tiny_mixtral_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(tiny_mixtral_dir, str(tmp_path), "--trainer.callbacks+=LmEvalValidation",
                      "--trainer.callbacks.tasks=[kit_blimpp]"))
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: tasks: unknown task 'kit_blimpp'")


CONF = sorted((REPO / "tests" / "conf").glob("*.yaml"))


@pytest.mark.parametrize("conf", CONF, ids=[c.stem for c in CONF])
def test_each_small_yaml_runs_the_real_cli_end_to_end(conf, tmp_path, monkeypatch):
    """torchgeo style: the real ``main()`` on a small YAML per method and callback set, from the checkout."""
    monkeypatch.chdir(REPO)
    config = yaml.safe_load(conf.read_text())
    export = tmp_path / "export"
    cli = main(["fit", "--config", str(conf), f"--trainer.default_root_dir={tmp_path}", f"--prune.export_dir={export}"])
    record = json.loads((export / "pruning.json").read_text())
    init = config["model"]["init_args"]
    assert record["method"] == init.get("method", "DiEP")
    assert type(cli.model).__name__ == config["model"]["class_path"].rsplit(".", 1)[-1]
    prune = config["prune"]["init_args"]
    before = [layer["experts_before"] for layer in record["layers"]]
    removed = [len(layer["removed"]) for layer in record["layers"]]
    if prune["mode"] == "uniform":
        assert removed == [round(prune["sparsity"] * n) for n in before]
    else:
        assert sum(removed) == round(prune["sparsity"] * sum(before))
    listed = [c["class_path"].rsplit(".", 1)[-1] for c in config["trainer"].get("callbacks") or []]
    assert any(layer["merges"] for layer in record["layers"]) == ("ExpertMerging" in listed)
    assert (record["plan"]["skipping"] is not None) == ("SkipCalibration" in listed)
    calibrated = record["plan"].get("router_calibration")
    assert (calibrated is not None) == ("RouterCalibration" in listed)
    if calibrated:
        assert calibrated["heldout_kl_after"] <= calibrated["heldout_kl_before"]
        own = next(c["init_args"].get("sources") for c in config["trainer"]["callbacks"]
                   if c["class_path"].endswith("RouterCalibration"))
        assert calibrated["sources"] == (own or ["generated"])
        assert all(source in (export / "README.md").read_text() for source in own or ["generated"])
        assert calibrated["train_sequences"] + calibrated["heldout_sequences"] == next(
            c["init_args"].get("num_samples") or config["data"]["num_samples"] for c in config["trainer"]["callbacks"]
            if c["class_path"].endswith("RouterCalibration"))
        assert "Routers calibrated by distillation from the source model: yes" in (export / "README.md").read_text()
