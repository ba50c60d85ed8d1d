"""Every bad input fails through the real CLI with exit code 2 and one line naming the argument, no traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fit_args
from transformers import AutoConfig

from diep_lightning.main import main
from diep_lightning.testing import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the proof that a run left a user's files alone)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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
    expert_nan = save_tiny_model("mixtral", str(root / "nan_expert"), tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(expert_nan)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("nan")
    model.save_pretrained(expert_nan)
    (root / "taken").mkdir()
    # the source model tree, with a sibling model, for the export_dir cases that would destroy them
    zoo = root / "zoo"
    save_tiny_model("mixtral", str(zoo / "source"), tiny_tokenizer)
    (zoo / "source" / "training_log.json").write_text('{"precious": true}')
    save_tiny_model("mixtral", str(zoo / "sibling"), tiny_tokenizer)
    (root / "a_file.txt").write_text("user data")
    (root / "user_dir").mkdir()
    (root / "user_dir" / "notes.txt").write_text("user data")
    # damaged models
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("random_bytes", lambda b: bytes(len(b)) + b"x")):
        folder = Path(save_tiny_model("mixtral", str(root / name), tiny_tokenizer))
        weights = folder / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
    mismatched = Path(save_tiny_model("mixtral", str(root / "mismatched"), tiny_tokenizer))
    config = json.loads((mismatched / "config.json").read_text())
    config["intermediate_size"] = 2 * config["intermediate_size"]
    (mismatched / "config.json").write_text(json.dumps(config))
    too_many = Path(shutil.copytree(root / "zoo" / "sibling", root / "topk_gt_experts"))
    config = json.loads((too_many / "config.json").read_text())
    config["num_experts_per_tok"] = config["num_local_experts"] + 2
    (too_many / "config.json").write_text(json.dumps(config))
    no_tok = Path(shutil.copytree(root / "zoo" / "sibling", root / "no_tokenizer"))
    for file in no_tok.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            file.unlink()
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "calib_dir").mkdir()
    (root / "calib_dir" / "good.txt").write_text("some words of text\n" * 20)
    (root / "calib_dir" / "notes.txt").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.jsonl").write_bytes(json.dumps({"text": "caf\u00e9 " * 50}).encode().replace(b"\\u00e9", b"\xe9") + b"\n")
    (root / "bad.yaml").write_text("model:\n  lam: [1, 2\n")
    (root / "random.ckpt").write_bytes(bytes(range(256)) * 64)
    (root / "ckpt_dir").mkdir()
    return root


@pytest.fixture(scope="module")
def other_model_ckpt(tmp_path_factory, tiny_tokenizer):
    """A search checkpoint of a different model (tiny Qwen2-MoE), and a truncated copy of it."""
    root = tmp_path_factory.mktemp("other")
    qwen = save_tiny_model("qwen2_moe", str(root / "qwen"), tiny_tokenizer)
    main(fit_args(qwen, str(root / "run"), epochs=1))
    ckpt = sorted((root / "run").rglob("*.ckpt"))[-1]
    data = ckpt.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    return {"ckpt": str(ckpt), "truncated": str(root / "truncated.ckpt")}


PRUNE = ["--prune=GlobalExpertPruning"]

# (id, model dir key or None for the tiny Mixtral, extra CLI args, the argument the one line must start with)
CASES = [
    ("sparsity_zero", None, [*PRUNE, "--prune.sparsity=0"], "sparsity:"),
    ("sparsity_one", None, [*PRUNE, "--prune.sparsity=1.0"], "sparsity:"),
    ("sparsity_negative", None, [*PRUNE, "--prune.sparsity=-0.2"], "sparsity:"),
    ("uniform_below_top_k", None, [*PRUNE, "--prune.sparsity=0.9", "--prune.mode=uniform"],
     "sparsity:"),
    ("global_below_top_k", None, [*PRUNE, "--prune.sparsity=0.95"], "sparsity:"),
    ("bad_mode", None, [*PRUNE, "--prune.mode=layerwise"], "layerwise"),
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
    ("teacher_cache_device_unknown", None, ["--model.teacher_cache_device=gpu"], "teacher_cache_device"),
    ("unknown_method", None, ["--model=BaselineModule", "--model.method=magic"], "model.method"),
    ("unknown_callback_argument", None, [*PRUNE, "--prune.sparsityy=0.5"], "sparsityy"),
    ("export_dir_exists", None, [*PRUNE, "--prune.export_dir={root}/taken"], "export_dir:"),
    ("export_dir_not_writable", None, [*PRUNE, "--prune.export_dir={root}/afile/out"], "export_dir:"),
    ("lm_eval_task_unknown", None, ["--trainer.callbacks+=LmEvalValidation", "--trainer.callbacks.tasks=[kit_piqaa]"],
     "tasks: unknown task 'kit_piqaa'"),
    ("lm_eval_output_users_file", None,
     ["--trainer.callbacks+=LmEvalValidation", "--trainer.callbacks.output={root}/a_file.txt"],
     "output: {root}/a_file.txt exists and is not the summary of an earlier LmEvalValidation"),
    ("nan_loss", None, ["--model.lam=1e38"], "loss: non-finite loss"),
    ("nan_weights", "nan", [], "model_name_or_path: non-finite weights (NaN/inf) in lm_head.weight"),
    ("nan_expert_reap", "nan_expert", ["--model=BaselineModule", "--model.method=reap", *PRUNE],
     "model_name_or_path: non-finite weights (NaN/inf) in MoE layer 1 (decoder layer 1), expert(s) [3]"),
    # #14 data loss: an export that would replace or enclose the source model, a sibling, a file or a user folder
    ("export_dir_is_source", "zoo/source",
     [*PRUNE, "--prune.export_dir={root}/zoo/source", "--prune.overwrite=true"],
     "export_dir: {root}/zoo/source is {root}/zoo/source"),
    ("export_dir_contains_source", "zoo/source",
     [*PRUNE, "--prune.export_dir={root}/zoo", "--prune.overwrite=true"],
     "export_dir: {root}/zoo contains {root}/zoo/source"),
    ("export_dir_inside_source", "zoo/source",
     [*PRUNE, "--prune.export_dir={root}/zoo/source/pruned"], "export_dir: {root}/zoo/source/pruned lies inside"),
    ("export_dir_is_a_file", "zoo/source",
     [*PRUNE, "--prune.export_dir={root}/a_file.txt", "--prune.overwrite=true"],
     "export_dir: {root}/a_file.txt is an existing file"),
    ("export_dir_not_an_export", "zoo/source",
     [*PRUNE, "--prune.export_dir={root}/user_dir", "--prune.overwrite=true"],
     "export_dir: {root}/user_dir exists and is not a diep_lightning export"),
    ("export_dir_checkout", "zoo/source", [*PRUNE, "--prune.export_dir=.", "--prune.overwrite=true"],
     "export_dir: {repo} contains {repo}/models"),
    ("export_dir_in_shipped_models", "zoo/source", [*PRUNE, "--prune.export_dir={repo}/models/pruned"],
     "export_dir: {repo}/models/pruned lies inside {repo}/models"),
    # silent wrong results
    ("ckpt_other_model", None, ["--ckpt_path={ckpt}"], "ckpt_path: {ckpt} was made for model"),
    ("ckpt_directory", None, ["--ckpt_path={root}/ckpt_dir"], "ckpt_path: {root}/ckpt_dir is a directory"),
    ("ckpt_random_bytes", None, ["--ckpt_path={root}/random.ckpt"], "ckpt_path: {root}/random.ckpt is not a readable"),
    ("ckpt_truncated", None, ["--ckpt_path={truncated}"], "ckpt_path: {truncated} is not a readable"),
    ("max_epochs_zero", None, [*PRUNE, "--trainer.max_epochs=0"], "trainer.max_epochs:"),
    ("max_epochs_negative", None, ["--trainer.max_epochs=-2"], "trainer: `max_epochs` must be a non-negative"),
    ("calibration_folder_with_a_binary_file", None, ["--data.sources={root}/calib_dir"],
     "sources[0]='{root}/calib_dir', file {root}/calib_dir/notes.txt: a binary file"),
    ("sparsity_removes_nothing", None, [*PRUNE, "--prune.sparsity=0.01"], "sparsity: 0.01 removes no expert"),
    ("seq_len_beyond_positions", None, ["--data.seq_len=4096"], "seq_len: 4096 tokens per sequence exceed"),
    ("calibration_binary_txt", None, ["--data.sources={root}/binary.txt"], "sources[0]='{root}/binary.txt': a binary file"),
    ("calibration_latin1_jsonl", None, ["--data.sources={root}/latin1.jsonl"], "sources[0]='{root}/latin1.jsonl': not UTF-8 text"),
    # damaged input: one line naming the file
    ("weights_truncated", "truncated", [], "model_name_or_path: cannot read the weights in {root}/truncated"),
    ("weights_random_bytes", "random_bytes", [], "model_name_or_path: cannot read the weights in {root}/random_bytes"),
    ("weights_mismatch_config", "mismatched", [], "model_name_or_path:"),
    # checks that run before the model loads
    ("top_k_above_experts", "topk_gt_experts", [], "model_name_or_path: the config routes each token to"),
    ("negative_learning_rate", None, ["--model.alpha_optimizer=torch.optim.Adam", "--model.alpha_optimizer.lr=-0.1"],
     "alpha_optimizer: Invalid learning rate"),
    ("missing_tokenizer", "no_tokenizer", [], "tokenizer: could not load a tokenizer from"),
    ("pruning_twice", None, ["--config=configs/tiny_mixtral.yaml", "--trainer.callbacks+=GlobalExpertPruning"],
     "prune: pruning is set under prune: and again in trainer.callbacks"),
    ("yaml_syntax", None, ["--config={root}/bad.yaml"], "config: {root}/bad.yaml line 3 column 1 is not valid YAML"),
    ("model_path_without_dot", "models/nope", [], "model_name_or_path: 'models/nope' does not exist"),
    ("skipping_top1", "top1", ["--trainer.callbacks+=SkipCalibration"], "SkipCalibration: skipping needs top-k >= 2"),
    ("skipping_strength_zero", None, ["--trainer.callbacks+=SkipCalibration", "--trainer.callbacks.strength=0"],
     "strength: must be a number > 0"),
    ("merging_nothing_pruned", None, ["--trainer.callbacks+=ExpertMerging"], "ExpertMerging: nothing is pruned"),
    ("merging_unknown_weights", None, ["--trainer.callbacks+=ExpertMerging",
                                       "--trainer.callbacks.weights=median"], "weights: must be one of"),
    ("merging_zero_temperature", None, ["--trainer.callbacks+=ExpertMerging",
                                        "--trainer.callbacks.temperature=0"], "temperature: must be > 0"),
    ("merging_share_above_one", None, ["--trainer.callbacks+=ExpertMerging", "--trainer.callbacks.shares=[0.8,1.5]"],
     "shares: every share must be in (0, 1]"),
    ("export_dir_tilde_alone", None, ["--config=configs/tiny_mixtral.yaml", "--prune.export_dir=~"],
     "export_dir: '~' reads as YAML's null"),
    ("export_dir_quoted_empty", None, ["--config=configs/tiny_mixtral.yaml", '--prune.export_dir=""'],
     "export_dir: '\"\"' names no folder"),
    ("router_calibration_nothing_pruned", None, ["--trainer.callbacks+=RouterCalibration"],
     "RouterCalibration: nothing is pruned"),
    ("router_calibration_zero_steps", None, ["--trainer.callbacks+=RouterCalibration", "--trainer.callbacks.steps=0"],
     "steps: must be an integer >= 1"),
    ("router_calibration_unknown_group", None, ["--trainer.callbacks+=RouterCalibration",
                                                "--trainer.callbacks.groups=[router,experts]"],
     "groups: unknown parameter group 'experts'"),
    ("router_calibration_group_the_family_lacks", None, ["--config=configs/tiny_mixtral.yaml",
                                                         "--trainer.callbacks+=RouterCalibration",
                                                         "--trainer.callbacks.groups=[shared_gate]"],
     "groups: MixtralFamily has no 'shared_gate' parameters"),
    ("router_calibration_missing_sources", None, ["--config=configs/tiny_mixtral.yaml",
                                                  "--trainer.callbacks+=RouterCalibration",
                                                  "--trainer.callbacks.sources=[/nonexistent/serving_text.txt]"],
     "sources[0]='/nonexistent/serving_text.txt'"),
    ("router_calibration_source_twice", None, ["--config=configs/tiny_mixtral.yaml",
                                                "--trainer.callbacks+=RouterCalibration",
                                                "--trainer.callbacks.sources=[generated,generated]"],
     "sources: 'generated' is listed twice"),
    ("router_calibration_weights_not_one_per_source", None, ["--config=configs/tiny_mixtral.yaml",
                                                             "--trainer.callbacks+=RouterCalibration",
                                                             "--trainer.callbacks.weights=[0.5,0.5]"],
     "weights: 2 entries for 1 sources ['generated']"),
    ("naee_global_mode", None, ["--model=BaselineModule", "--model.method=naee", "--model.naee_keep=4", *PRUNE],
     "mode: NAEE"),
    ("naee_keep_missing", None, ["--model=BaselineModule", "--model.method=naee", *PRUNE], "naee_keep: NAEE needs"),
    ("naee_keep_mismatch", None, ["--model=BaselineModule", "--model.method=naee", "--model.naee_keep=4", *PRUNE,
                                  "--prune.mode=uniform", "--prune.sparsity=0.25"],
     "naee_keep: 4 experts per layer, but sparsity 0.25 keeps 6"),
    ("diep_as_baseline", None, ["--model=BaselineModule", "--model.method=diep"], "model.method"),
]


@pytest.mark.parametrize("name,model_key,extra,starts", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_in_one_line(name, model_key, extra, starts, bad_inputs, tiny_mixtral_dir, tmp_path,
                                     capsys, monkeypatch, request):
    model_dir = tiny_mixtral_dir if model_key is None else str(bad_inputs / model_key)
    if model_key == "models/nope":
        model_dir = model_key
    names = {"root": bad_inputs, "repo": REPO}
    if "ckpt" in name and "{" in "".join(extra) and ("ckpt}" in "".join(extra) or "truncated}" in "".join(extra)):
        names.update(request.getfixturevalue("other_model_ckpt"))
    monkeypatch.chdir(REPO)  # relative paths ('.', 'models/nope') resolve from the checkout, as for a user
    before = {p: tree_digest(p) for p in (bad_inputs / "zoo", bad_inputs / "user_dir", REPO / "models")}
    file_before = (bad_inputs / "a_file.txt").read_bytes()
    args = fit_args(model_dir, str(tmp_path / "run"), *[a.format(**names) for a in extra], epochs=1)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    starts = starts.format(**names)
    assert last[len("error: "):].startswith(starts) or starts in last, last
    if name not in ("nan_loss",):
        assert not list((tmp_path / "run").glob("**/*.ckpt")), "no search may run after bad input"
        assert not list((tmp_path / "run").glob("**/version_*")), "a refused run leaves no log folder behind"
    assert {p: tree_digest(p) for p in before} == before, "a user's files changed"
    assert (bad_inputs / "a_file.txt").read_bytes() == file_before
    assert not [p for p in bad_inputs.rglob(".*partial-*")], "a partial export was left behind"


def test_nan_loss_keeps_the_last_good_scores(tiny_mixtral_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(fit_args(tiny_mixtral_dir, str(tmp_path), "--model.lam=1e38", epochs=1))
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


# ---------------------------------------------------------------------- the library API: exports and pruning.json
def _export(tmp_path, name="export", mode="global", **kwargs):
    from diep_lightning.export import export_pruned
    from diep_lightning.removal import apply_plan, size_report
    from diep_lightning.families import get_family
    from diep_lightning.pruning import select_experts
    from diep_lightning.testing import tiny_model

    model = tiny_model("mixtral")
    blocks = get_family(model).blocks(model)
    scores = [torch.arange(b.num_experts, dtype=torch.float32) * (i + 1) for i, b in enumerate(blocks)]
    plan = select_experts(scores, 0.375, [b.top_k for b in blocks], mode)
    sizes = size_report(model)
    apply_plan(model, plan)
    return export_pruned(model, plan, tmp_path / name, source="tiny", original=sizes, **kwargs)[0]


def _edit_record(record, case):
    layer = record["layers"][0]
    if case == "duplicate_ids":
        layer["kept"][1] = layer["kept"][0]
    elif case == "out_of_range_ids":
        layer["removed"][0] = layer["experts_before"] + 5
    elif case == "negative_ids":
        layer["removed"][0] = -1
    elif case == "skip_gammas_shape":
        record["plan"]["skipping"] = {"gammas": {"0": [[0.1, 0.2], [0.3, 0.4]]}}
    return json.dumps(record)


# (id, how pruning.json is damaged, what the one line must contain)
RECORD_CASES = [
    ("duplicate_ids", "duplicate_ids", "must each list distinct ids"),
    ("out_of_range_ids", "out_of_range_ids", "outside 0..7"),
    ("negative_ids", "negative_ids", "[-1] outside 0..7"),
    ("skip_gammas_shape", "skip_gammas_shape", "skip_gammas of MoE layer 0 must be a"),
    ("not_json", "not_json", "is not valid JSON (line 1 column 2"),
]


@pytest.mark.parametrize("case,edit,message", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_a_damaged_pruning_json_is_refused_on_load(case, edit, message, tmp_path):
    from diep_lightning import load_pruned

    path = _export(tmp_path)
    record = json.loads((path / "pruning.json").read_text())
    (path / "pruning.json").write_text("{not json" if edit == "not_json" else _edit_record(record, edit))
    with pytest.raises(ValueError) as err:
        load_pruned(path)
    assert str(err.value).startswith("path: ") and "pruning.json" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_the_evaluation_cli_names_a_damaged_pruning_json(tmp_path):
    path = _export(tmp_path)
    (path / "pruning.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "diep_lightning.evaluation", "--model", str(path), "--tasks",
                             "kit_blimp_causative", "--limit", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: path: "), result.stderr[-500:]


def test_two_runs_racing_for_one_export_dir_never_replace_each_other(tmp_path):
    from diep_lightning.export_dir import atomic_directory

    target = tmp_path / "out"
    first, second = atomic_directory(target, overwrite=False), atomic_directory(target, overwrite=False)
    a, b = first.__enter__(), second.__enter__()  # both passed the existence check
    (a / "who").write_text("first")
    (b / "who").write_text("second")
    first.__exit__(None, None, None)
    with pytest.raises(FileExistsError, match="export_dir: .* was created by someone else"):
        second.__exit__(None, None, None)
    assert (target / "who").read_text() == "first"
    conflicts = list(tmp_path.glob("out.conflict-*"))
    assert len(conflicts) == 1 and (conflicts[0] / "who").read_text() == "second"
    assert not list(tmp_path.glob(".out.*"))


def test_a_killed_runs_partial_export_is_removed_by_the_next_run(tmp_path, capsys):
    from diep_lightning.export_dir import PARTIAL_MARKER, check_export_dir

    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    partial = tmp_path / ".out.partial-deadbeef"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"0" * 1024)
    import socket

    (partial / PARTIAL_MARKER).write_text(json.dumps({"pid": victim.pid, "host": socket.gethostname()}))
    user_hidden = tmp_path / ".out.partial-user"  # same pattern, but no marker: not ours, only reported
    user_hidden.mkdir()
    check_export_dir(tmp_path / "out", overwrite=False)
    assert partial.exists(), "a live run's partial export must be left alone"
    victim.kill()
    victim.wait()
    check_export_dir(tmp_path / "out", overwrite=False)
    assert not partial.exists() and user_hidden.exists()
    err = capsys.readouterr().err
    assert "removed" in err and f"rm -r '{user_hidden}'" in err


def test_overwrite_replaces_a_previous_export_and_files_are_world_readable(tmp_path):
    path = _export(tmp_path)
    (path / "notes.txt").write_text("the user's")  # a file no export wrote: overwrite refuses, naming it
    with pytest.raises(FileExistsError, match="holds notes.txt, which no export wrote"):
        _export(tmp_path, overwrite=True)
    assert (path / "notes.txt").read_text() == "the user's"
    (path / "notes.txt").unlink()
    path = _export(tmp_path, overwrite=True)
    assert (path / "pruning.json").is_file() and (path / ".diep_export.json").is_file()
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["pruning.json"], modes
    assert not list(tmp_path.glob(".export.*"))


def test_load_pruned_reads_a_uniform_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from diep_lightning import load_pruned

    path = _export(tmp_path, mode="uniform")
    ids = torch.tensor([[1, 2, 3, 4]])
    ours = load_pruned(path)
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits)
    assert getattr(ours.config, "auto_map", None) is None


def test_an_export_drops_the_source_tokenizer_s_code_map(tiny_tokenizer, tmp_path):
    """A source tokenizer whose config maps to custom code: the export keeps the tokenizer, not the map."""
    import json
    import shutil

    from transformers import AutoTokenizer

    source = tmp_path / "source_tokenizer"
    shutil.copytree(tiny_tokenizer.name_or_path, source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["someone/else--tokenization_x.XTokenizer", None]}
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(source)
    path = _export(tmp_path, tokenizer=tokenizer)
    saved = json.loads((path / "tokenizer_config.json").read_text())
    assert "auto_map" not in saved and saved.get("tokenizer_class")
    assert AutoTokenizer.from_pretrained(path)("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_a_full_disk_during_export_exits_1_in_one_line_and_leaves_nothing(tiny_mixtral_dir, tmp_path, capsys,
                                                                           monkeypatch):
    import errno

    import diep_lightning.export as export

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(export, "plot_plan", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tiny_mixtral_dir, str(tmp_path / "run"), *PRUNE, f"--prune.export_dir={tmp_path}/out",
                      epochs=1))
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}/out/model.safetensors: No space left on device"), last
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_refused_run_removes_only_the_log_folders_it_created(tiny_mixtral_dir, tmp_path, capsys):
    """An earlier run's version_0 (with the user's notes in it) stays; the refused run's own version_1 goes."""
    earlier = tmp_path / "run" / "lightning_logs" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "notes.txt").write_text("mine")
    for _ in range(2):
        with pytest.raises(SystemExit):
            main(fit_args(tiny_mixtral_dir, str(tmp_path / "run"), "--trainer.logger=true",
                          *PRUNE, "--trainer.max_epochs=0"))
    assert "trainer.max_epochs" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "lightning_logs").iterdir()) == ["version_0"]
    assert (earlier / "notes.txt").read_text() == "mine"
