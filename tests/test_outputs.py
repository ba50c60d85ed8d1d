"""Output arguments of the benchmarks and the evaluation command: a run writes a new file or its own earlier one,
refuses anything else in one line naming the argument before it measures, and leaves the user's file as it was."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

from diep_lightning.evaluation.__main__ import main as evaluation_main
from diep_lightning.outputs import Refusal, save_text, writable_file, written_by

# every benchmark that writes one JSON of its run and a section of RESULTS.md
JSON_BENCHMARKS = ["speed", "skip_overhead", "expert_matmul", "search_cost", "cka_cost", "skip_strength"]
USERS = "my notes, not a benchmark's\n"


def _refused(capsys, run, flag: str) -> str:
    """Run ``run``; it must exit 2 with one stderr line naming ``flag`` and no traceback."""
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"error: {flag}: " in err, err
    return err


@pytest.mark.parametrize("name", JSON_BENCHMARKS)
def test_a_benchmark_refuses_another_files_before_measuring(name, tmp_path, capsys):
    main = importlib.import_module(f"benchmarks.{name}").main
    users = tmp_path / "notes.txt"
    users.write_text(USERS)
    other = tmp_path / "other.json"  # another benchmark's run
    other.write_text(json.dumps({"command": "python -m benchmarks.run_other --x 1", "runs": {}}))
    new_out = ["--out", str(tmp_path / "new.json")]

    _refused(capsys, lambda: main(["--from", str(tmp_path / "missing.json")]), "--from")
    _refused(capsys, lambda: main(["--from", str(other), "--results", ""]), "--from")
    _refused(capsys, lambda: main(["--from", str(users), "--results", ""]), "--from")
    assert "not the JSON of an earlier" in _refused(capsys, lambda: main(["--out", str(users)]), "--out")
    _refused(capsys, lambda: main(["--out", str(other)]), "--out")
    _refused(capsys, lambda: main(["--out", str(tmp_path)]), "--out")  # a folder
    _refused(capsys, lambda: main([*new_out, "--results", str(users)]), "--results")
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    _refused(capsys, lambda: main(["--out", str(blocked / "run.json")]), "--out")  # under a file
    assert users.read_text() == USERS and json.loads(other.read_text())["command"].endswith("--x 1")
    assert not (tmp_path / "new.json").exists()


def test_a_benchmark_renders_its_own_earlier_run_into_a_report_or_an_empty_file(tmp_path, capsys):
    from benchmarks import cka_cost

    run = tmp_path / "cka.json"
    cka_cost.main(["--shapes", "mixtral", "--tokens", "8", "--feature-experts", "2", "--threads", "1",
                   "--out", str(run), "--results", ""])
    assert written_by("python -m benchmarks.cka_cost")(run)
    cka_cost.main(["--shapes", "mixtral", "--tokens", "8", "--feature-experts", "2", "--threads", "1",
                   "--out", str(run), "--results", ""])  # its own earlier JSON is replaced
    empty = tmp_path / "empty.md"
    empty.write_text("")
    cka_cost.main(["--from", str(run), "--results", str(empty)])
    report = empty.read_text()
    assert "<!-- cka_cost:begin -->" in report
    (tmp_path / "report.md").write_text("# Benchmark results\n\nkept\n")
    cka_cost.main(["--from", str(run), "--results", str(tmp_path / "report.md")])
    assert "kept" in (tmp_path / "report.md").read_text() and "cka_cost:end" in (tmp_path / "report.md").read_text()
    capsys.readouterr()
    # another benchmark's run is no cka_cost run
    _refused(capsys, lambda: cka_cost.main(["--from", str(Path(__file__).resolve().parents[1] / "benchmarks" / "speed.json")]), "--from")


def test_the_suite_runner_refuses_a_users_report_and_a_folder_without_a_run(tmp_path, capsys):
    from benchmarks import run as bench

    (tmp_path / "RESULTS.md").write_text(USERS)
    _refused(capsys, lambda: bench.main(["--out", str(tmp_path)]), "--out")
    (tmp_path / "RESULTS.md").unlink()
    from benchmarks.files import run_json

    foreign = run_json(tmp_path)  # where the run's JSON goes: another benchmark's JSON is not replaced
    foreign.parent.mkdir()
    foreign.write_text(json.dumps({"command": "python -m benchmarks.speed"}))
    _refused(capsys, lambda: bench.main(["--out", str(tmp_path)]), "--out")
    _refused(capsys, lambda: bench.main(["--combine", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]),
             "--combine")
    _refused(capsys, lambda: bench.main(["--out", str(foreign)]), "--out")  # a file
    assert json.loads(foreign.read_text()) == {"command": "python -m benchmarks.speed"}
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name, folder", [("serving", "tiny-mixtral-uniform50"), ("serving", "tiny-mixtral-full-plugin"),
                                          ("serving_speed", "mixtral-full")])
def test_the_serving_benchmarks_refuse_a_users_folder_where_an_export_goes(name, folder, tmp_path, capsys):
    """Checked before vLLM is imported or anything is trained, so it holds without vLLM installed."""
    main = importlib.import_module(f"benchmarks.{name}").main
    mine = tmp_path / folder
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "weights.bin").write_text("mine")
    _refused(capsys, lambda: main(["--out", str(tmp_path), "--results", ""]), "--out")
    assert (mine / "weights.bin").read_text() == "mine"


def test_the_evaluation_command_refuses_a_users_output_file_and_render_folder(tmp_path, capsys):
    users = tmp_path / "notes.txt"
    users.write_text(USERS)
    assert evaluation_main(["--model", "models/tiny-mixtral", "--output", str(users)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--output" in err and users.read_text() == USERS
    metrics = tmp_path / "metrics.json"  # keys that look like metrics do not make a user's JSON ours
    metrics.write_text(json.dumps({"train/loss": 1.0, "val/acc": 0.5}))
    assert evaluation_main(["--model", "models/tiny-mixtral", "--output", str(metrics), "--list"]) == 2
    assert "--output" in capsys.readouterr().err and json.loads(metrics.read_text()) == {"train/loss": 1.0, "val/acc": 0.5}
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"_written_by": "python -m diep_lightning.evaluation", "kit_copa/acc": 0.5}))
    assert evaluation_main(["--output", str(ours), "--list"]) == 0  # an earlier run's results pass the check
    capsys.readouterr()
    assert evaluation_main(["--render", str(users)]) == 2
    assert "--render" in capsys.readouterr().err

    rendered = tmp_path / "tasks"
    assert evaluation_main(["--render", str(rendered)]) == 0
    yaml = next(rendered.glob("*.yaml"))
    assert evaluation_main(["--render", str(rendered)]) == 0  # its own earlier render is replaced
    clash = tmp_path / "mine"
    clash.mkdir()
    (clash / yaml.name).write_text(USERS)
    assert evaluation_main(["--render", str(clash)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--render" in err and (clash / yaml.name).read_text() == USERS


def test_writable_file_and_save_text(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "new.json"
    assert writable_file(target, "--out") == target  # a new file under folders to be made
    save_text(target, "first")
    with pytest.raises(Refusal, match=r"^--out: .* exists and is not a file this command wrote"):
        writable_file(target, "--out")
    assert writable_file(target, "--out", own=lambda p: p.read_text() == "first") == target

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        save_text(target, "second")
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["new.json"]


def test_the_training_tool_never_writes_into_the_shipped_models_or_over_a_users_model(tmp_path, capsys):
    from tools import train_tiny_moe

    shipped = Path(__file__).resolve().parents[1] / "models" / "tiny-mixtral"
    _refused(capsys, lambda: train_tiny_moe.parse_args(["--out", str(shipped)]), "--out")
    _refused(capsys, lambda: train_tiny_moe.parse_args(["--out", str(shipped / "new"), "--tokenizer-only"]), "--out")
    users = tmp_path / "model"
    users.mkdir()
    (users / "config.json").write_text("{}")
    assert "did not train" in _refused(capsys, lambda: train_tiny_moe.parse_args(["--out", str(users)]), "--out")
    (users / "training_log.json").write_text("{}")  # an earlier run of the tool: replaced (or resumed)
    assert train_tiny_moe.parse_args(["--out", str(users)]).out == users


def test_lm_eval_validation_replaces_only_its_own_summary(tmp_path):
    from diep_lightning.callbacks import LmEvalValidation

    users = tmp_path / "notes.json"
    users.write_text(json.dumps({"mine": 1}))
    with pytest.raises(Refusal, match=r"^output: .* is not the summary of an earlier LmEvalValidation"):
        LmEvalValidation(tasks=["kit_copa"], output=str(users))
    shaped = tmp_path / "shaped.json"  # a user's file with a summary's keys is still the user's
    shaped.write_text(json.dumps({"tasks": ["kit_copa"], "limit": 2, "baseline": {}, "pruned": {}, "ratio": {}}))
    with pytest.raises(Refusal, match="^output: "):
        LmEvalValidation(tasks=["kit_copa"], output=str(shaped))
    earlier = tmp_path / "lm_eval.json"
    earlier.write_text(json.dumps({"_written_by": "diep_lightning.callbacks.LmEvalValidation", "tasks": ["kit_copa"],
                                   "limit": 2, "baseline": {}, "pruned": {}, "ratio": {}}))
    assert LmEvalValidation(tasks=["kit_copa"], output=str(earlier)).output == str(earlier)
    assert LmEvalValidation(tasks=["kit_copa"], output=str(tmp_path / "new" / "lm_eval.json")).output


def test_the_model_card_tool_replaces_only_a_card_it_wrote(tmp_path, capsys):
    from tools import model_card

    shipped = Path(__file__).resolve().parents[1] / "models" / "tiny-mixtral"
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "README.md", "card_metrics.json", "training_log.json"):
        (model / name).write_bytes((shipped / name).read_bytes())
    model_card.main(["--model", str(model), "--render-only"])  # its own card: re-rendered
    assert model_card.CARD_SECTION in (model / "README.md").read_text()
    (model / "README.md").write_text(USERS)
    _refused(capsys, lambda: model_card.main(["--model", str(model), "--render-only"]), "--model")
    assert (model / "README.md").read_text() == USERS
    (model / "README.md").unlink()
    (model / "card_metrics.json").write_text(json.dumps({"mine": 1}))
    _refused(capsys, lambda: model_card.main(["--model", str(model)]), "--model")
    _refused(capsys, lambda: model_card.main(["--model", str(tmp_path / "nothing")]), "--model")


def test_the_evaluation_commands_argument_errors_are_one_line(capsys):
    err = _refused(capsys, lambda: evaluation_main(["--limit", "abc"]), "argument --limit")
    assert err.startswith("python -m diep_lightning.evaluation: error:")


@pytest.mark.parametrize("name", ["speed", "search_cost", "skip_overhead", "expert_matmul"])
def test_a_gpu_run_on_a_machine_without_one_is_refused_before_measuring(name, capsys, monkeypatch):
    main = importlib.import_module(f"benchmarks.{name}").main
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _refused(capsys, lambda: main(["--device", "cuda", "--results", ""]), "--device")


def test_the_tuning_proxies_refuse_bad_input_and_append_only_to_a_tuning_log(tmp_path, capsys):
    from benchmarks import tune, tune_merging

    assert tune.tuning_log(Path(tune.__file__).parent / "results" / "tuning_results.jsonl")  # the shipped log
    users = tmp_path / "notes.txt"
    users.write_text(USERS)
    assert "not a tuning log" in _refused(capsys, lambda: tune.main(["--results", str(users)]), "--results")
    assert users.read_text() == USERS
    for main in (tune.main, tune_merging.main):
        _refused(capsys, lambda: main(["--model", str(tmp_path / "nothing")]), "--model")
    assert "unknown settings" in _refused(capsys, lambda: tune_merging.main(["--settings", '[{"temp": 1}]']),
                                          "--settings")
    _refused(capsys, lambda: tune_merging.main(["--sparsities", "half"]), "--sparsities")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    from benchmarks import tune_router

    assert "a binary file" in _refused(capsys, lambda: tune_router.main(["--sources", f"bundled,{binary}",
                                                                          "--results", str(tmp_path / "log.jsonl")]),
                                       "--sources")
    assert not (tmp_path / "log.jsonl").exists()
    with pytest.raises(SystemExit, match="error: --module: not JSON"):
        tune.main(["--module", "{bad"])


@pytest.mark.parametrize("name, args, flag", [
    ("speed", ["--repeats", "0"], "argument --repeats"), ("speed", ["--hidden", "3"], "argument --hidden"),
    ("speed", ["--prefill-tokens", "0"], "argument --prefill-tokens"), ("speed", ["--dtypes", "int8"], "--dtypes"),
    ("speed", ["--layers", "x"], "argument --layers"), ("skip_overhead", ["--threads", "0"], "argument --threads"),
    ("expert_matmul", ["--hidden", "100"], "argument --hidden"), ("search_cost", ["--sizes", "0x2"], "--sizes"),
    ("search_cost", ["--seq-len", "1"], "argument --seq-len"), ("cka_cost", ["--feature-experts", "-1"],
                                                               "argument --feature-experts"),
    ("skip_strength", ["--jobs", "0"], "argument --jobs"), ("serving_speed", ["--vocab", "8"], "argument --vocab"),
    ("serving", ["--prompts", "0"], "argument --prompts"),
])
def test_counts_no_run_can_use_are_refused_in_one_line(name, args, flag, capsys):
    main = importlib.import_module(f"benchmarks.{name}").main
    _refused(capsys, lambda: main([*args, "--results", ""]), flag)
