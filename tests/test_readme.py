"""Every command the README shows, run as written on the shipped tiny models (with small limits), so the
documentation cannot drift from the code. A new fenced command that no rule below knows fails the test."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diep_lightning.main import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
#: the README and every page of docs/: a command documented anywhere is run by a test
DOCUMENTS = [README, *((p.read_text()) for p in sorted((REPO / "docs").glob("*.md")))]

#: Commands run by another test, with the test that runs them.
COVERED_ELSEWHERE = {
    "python -m benchmarks.run": "tests/test_benchmark_smoke.py::test_benchmark_smoke",
    "python -m benchmarks.speed": "tests/test_benchmark_smoke.py::test_speed_benchmark_smoke",
    "python -m benchmarks.search_cost": "tests/test_benchmark_smoke.py::test_search_cost_benchmark_smoke",
    "python -m benchmarks.skip_strength": "tests/test_benchmark_smoke.py::test_skip_strength_benchmark_smoke",
    "python -m benchmarks.skip_overhead": "tests/test_benchmark_smoke.py::test_skip_overhead_benchmark_smoke",
    "python -m benchmarks.cka_cost": "tests/test_benchmark_smoke.py::test_cka_cost_times_both_forms_and_they_agree",
    "python -m benchmarks.expert_matmul": "tests/test_benchmark_smoke.py::test_expert_matmul_times_each_rows_setting_and_refuses_bad_rows",
    "python -m pytest": ".ci/run",
    "bash tools/gpu_checks.sh": "tests/test_benchmark_smoke.py::test_the_gpu_check_script_parses_and_refuses_a_machine_without_a_gpu",
    "vllm serve": "tests/test_vllm.py::test_every_served_family_serves_a_global_export_with_transformers_tokens",  # vllm.LLM, in the vLLM venv
    "/opt/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server":
        "tests/test_vllm.py::test_the_openai_server_serves_an_export_with_transformers_tokens",
}

#: Appended right after `--config X` of a tiny config: one short epoch and a quick lm-eval (before the README's
#: own arguments, so `--trainer.callbacks.X` still reaches the config's LmEvalValidation).
FAST = ["--trainer.max_epochs=1", "--data.num_samples=8", "--data.seq_len=64", "--data.batch_size=4",
        "--trainer.enable_progress_bar=false"]
FAST_EVAL = ["--trainer.callbacks.limit=2", "--trainer.callbacks.tasks=[kit_blimp_causative,kit_wikitext2]"]


def fenced(language: str, documents: list[str] | None = None) -> list[str]:
    """The fenced blocks of ``language`` in the README (or in ``documents``)."""
    return [block for text in (documents or [README]) for block in re.findall(rf"```{language}\n(.*?)```", text, re.S)]


def readme_commands() -> list[str]:
    """Each shell command of the README's and docs' ```bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in fenced("bash", DOCUMENTS):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_the_documented_uses():
    joined = "\n".join(COMMANDS)
    for expected in ("python -m diep_lightning fit --config configs/tiny_mixtral.yaml",
                     "python -m diep_lightning.evaluation --model runs/.../pruned",
                     "lm_eval --model hf", "--prune.mode=uniform", "--trainer.callbacks+=ExpertMerging"):
        assert expected in joined
    assert fenced("python"), "the README shows how to load an export"


def test_the_quickstart_installs_what_ci_installs():
    ci = (REPO / ".ci" / "run").read_text()
    installs = [c for c in COMMANDS if c.startswith("pip install")]
    assert installs[:2] == ['pip install torch==2.13.0', 'pip install -e ".[test]"']
    assert '"torch==2.13.0"' in ci and '-e ".[test]"' in ci and "python3 -m pytest" in ci


@pytest.fixture(scope="module")
def quickstart_export(tmp_path_factory):
    """The README's first command, shortened (one epoch, 8 sequences, 2 documents per lm-eval task)."""
    root = tmp_path_factory.mktemp("quickstart")
    command = next(c for c in COMMANDS if c.startswith("python -m diep_lightning fit"))
    args = shlex.split(command)[3:]
    cli = main(_fast(args, root))
    pruning = cli.trainer.callbacks[0]
    assert pruning.export_path is not None and (pruning.export_path / "lm_eval.json").is_file()
    return pruning.export_path


def _fast(args: list[str], root: Path) -> list[str]:
    """Insert FAST (and FAST_EVAL when the config evaluates) after `--config X`, and write under ``root``."""
    config = yaml.safe_load((REPO / args[args.index("--config") + 1]).read_text())
    listed = [c["class_path"] for c in config["trainer"].get("callbacks") or []]
    extra = FAST + (FAST_EVAL if listed and listed[-1].endswith("LmEvalValidation") else [])
    extra += [f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"]
    at = args.index("--config") + 2
    return [*args[:at], *extra, *args[at:]]


FIT_COMMANDS = [c for c in COMMANDS if c.startswith("python -m diep_lightning fit")]


@pytest.mark.parametrize("command", FIT_COMMANDS, ids=range(len(FIT_COMMANDS)))
def test_every_fit_command_of_the_readme_runs(command, tmp_path, capsys, request):
    if "runs/.../pruned" in command:  # a command that reads an export: the quickstart's
        command = command.replace("runs/.../pruned", str(request.getfixturevalue("quickstart_export")))
        capsys.readouterr()
    args = shlex.split(command)[3:]
    config = yaml.safe_load((REPO / args[args.index("--config") + 1]).read_text()) if "--config" in args else None
    hub_model = config is not None and not (REPO / config["model"]["model_name_or_path"]).is_dir()
    if "--help" in args or "--print_config" in args or hub_model:
        # real-model configs need the hub and GPUs: check that they parse, as written
        with pytest.raises(SystemExit) as exit_info:
            main(args + ([] if "--help" in args or "--print_config" in args else ["--print_config"]))
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.strip()
        return
    cli = main(_fast(args, tmp_path))
    out = capsys.readouterr().out
    assert "[diep_lightning] finished in" in out, "every run ends with its summary"
    if config.get("prune") and "--prune=null" not in args:
        assert f"export     {tmp_path}" in out
        pruning = cli.trainer.callbacks[0]
        assert pruning.plan is not None and pruning.plan.num_removed > 0
        if "--prune.mode=uniform" in args:
            assert len({len(k) for k in pruning.plan.kept}) == 1


def test_the_quickstart_summary_names_the_scores_and_files(quickstart_export):
    assert (quickstart_export / "experts_per_layer.png").is_file()
    assert (quickstart_export / "lm_eval.json").is_file()


def _substitute(command: str, export: Path, tmp_path: Path) -> list[str]:
    command = command.replace("runs/.../pruned", str(export)).replace("/tmp/kit_tasks", str(tmp_path / "kit_tasks"))
    args = shlex.split(command)
    if "--limit" in args:  # the README's limits, made smaller still
        args[args.index("--limit") + 1] = "2"
    if args[:3] == ["python", "-m", "benchmarks.tune"]:
        args += ["--epochs", "1", "--num-samples", "8", "--seq-len", "64", "--eval-tokens", "2048",
                 "--results", str(tmp_path / "tuning.jsonl")]
    if args[:3] == ["python", "-m", "benchmarks.tune_merging"]:
        args += ["--sparsities", "0.5", "--num-samples", "8", "--seq-len", "64", "--batch-size", "4",
                 "--heldout-samples", "4", "--results", str(tmp_path / "tuning.jsonl")]
    if args[:3] == ["python", "-m", "benchmarks.tune_router"]:
        args[args.index("--settings") + 1] = '[{"steps": 4, "eval_every": 2}]'
        args += ["--num-samples", "8", "--seq-len", "64", "--eval-tokens", "2048",
                 "--results", str(tmp_path / "tuning.jsonl")]
    return args


OTHER_COMMANDS = [c for c in COMMANDS if not c.startswith(("python -m diep_lightning fit", "pip install"))
                  and not any(c.startswith(k) for k in COVERED_ELSEWHERE)]


def test_every_readme_command_has_a_rule():
    known = ("python -m diep_lightning.evaluation", "lm_eval ", "python -m benchmarks.tune")
    assert all(c.startswith(known) for c in OTHER_COMMANDS), [c for c in OTHER_COMMANDS if not c.startswith(known)]
    for test in COVERED_ELSEWHERE.values():
        file, _, name = test.partition("::")
        assert (REPO / file).is_file() and (not name or f"def {name}(" in (REPO / file).read_text()), test


def test_the_evaluation_and_lm_eval_commands_run_on_the_quickstart_export(quickstart_export, tmp_path):
    ordered = sorted(OTHER_COMMANDS, key=lambda c: not c.startswith("python -m diep_lightning.evaluation --render"))
    for command in ordered:
        args = _substitute(command, quickstart_export, tmp_path)
        if args[0] == "python":
            args[0] = sys.executable
        result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        if "benchmarks.tune" in command:
            assert (tmp_path / "tuning.jsonl").read_text().strip(), command
        elif "--model" in args or args[0] == "lm_eval":
            assert "blimp" in result.stdout, (command, result.stdout[-1000:])


def test_the_loading_snippet_runs_on_the_quickstart_export(quickstart_export):
    code = fenced("python")[0].replace("runs/.../pruned", str(quickstart_export))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own snippet
    assert scope["model"].config.diep_layers == scope["same"].config.diep_layers
