"""Offline evaluation kit: task YAMLs, lm-eval runs on a tiny random Mixtral, errors, CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from diep_lightning.evaluation import (
    SHIPPED_DATA_DIR,
    default_data_dir,
    evaluate,
    get_task_manager,
    list_kit_tasks,
    render_tasks,
)
from diep_lightning.evaluation.__main__ import main as cli_main

TOP_LEVEL = [
    "kit_arc_challenge",
    "kit_arc_easy",
    "kit_blimp",
    "kit_boolq",
    "kit_copa",
    "kit_hellaswag",
    "kit_lambada",
    "kit_mmlu",
    "kit_openbookqa",
    "kit_piqa",
    "kit_rte",
    "kit_wikitext2",
    "kit_winogrande",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the CI box has 2 shared cores; torch's intra-op threads contend badly with other processes there
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    return MixtralForCausalLM(cfg).eval()


def _check_acc(res, name, metric="acc"):
    v = res[name][metric]
    assert 0.0 <= v <= 1.0, (name, v)
    assert res.get(f"{name}/{metric}", v) == v


@pytest.mark.parametrize("which", ["shipped", "default"])
def test_templates_render_and_index(which):
    data_dir = SHIPPED_DATA_DIR if which == "shipped" else default_data_dir()
    kit = render_tasks(data_dir)
    assert not kit.missing, kit.missing
    assert kit.top_level() == TOP_LEVEL == list_kit_tasks(data_dir)
    leaves = [t for t in kit.tasks if t.startswith("kit_blimp_")]
    assert len(leaves) == 34 and len(kit.groups["kit_blimp"]) == 34
    assert len([t for t in kit.tasks if t.startswith("kit_mmlu_")]) == 57
    for f in kit.task_dir.rglob("*.yaml"):
        text = f.read_text()
        assert "@DATA_DIR@" not in text, f
        for line in text.splitlines():
            if line.strip().startswith(("test:", "dev:")) and '"' in line:
                path = line.split('"')[1]
                assert path.startswith(str(kit.data_dir)) and (kit.data_dir / path[len(str(kit.data_dir)) + 1 :]).is_file()
    tm = get_task_manager(data_dir)
    assert set(kit.names) <= set(tm.all_tasks)
    assert set(tm.all_groups) == {"kit_blimp", "kit_mmlu", "kit_mmlu_stem", "kit_mmlu_other", "kit_mmlu_humanities", "kit_mmlu_social_sciences"}


def test_every_shipped_task_builds_prompts():
    from lm_eval.tasks import get_task_dict

    tm = get_task_manager(SHIPPED_DATA_DIR)
    leaves = [n for n in list_kit_tasks(SHIPPED_DATA_DIR, include_subtasks=True) if n not in tm.all_groups]
    tasks = get_task_dict(leaves, tm)
    assert set(tasks) == set(leaves)
    for name, task in tasks.items():
        docs = list(task.test_docs())
        assert docs, name
        ctx, target = task.doc_to_text(docs[0]), task.doc_to_target(docs[0])
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(docs[0])
            assert len(choices) >= 2, name
            if isinstance(ctx, int):  # winogrande: the contexts are the choices, the gold index is the "text"
                assert 0 <= ctx < len(choices) and isinstance(target, str)
            else:
                assert isinstance(target, int) and 0 <= target < len(choices), name
        else:
            assert isinstance(target, str) and target.strip(), name
    assert tasks["kit_copa"].doc_to_text({"query": "The man fell, because", "choices": [], "gold": 0}) == "The man fell because"
    assert tasks["kit_wikitext2"].doc_to_target(next(iter(tasks["kit_wikitext2"].test_docs()))).startswith(" = ")


def test_evaluate_blimp_wikitext(tiny_model, tiny_tokenizer):
    tiny_model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    res = evaluate(tiny_model, tiny_tokenizer, tasks=("kit_blimp", "kit_wikitext2"), limit=3, batch_size=16)
    assert tiny_model.training  # mode restored
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream untouched
    json.dumps(res, allow_nan=False)
    _check_acc(res, "kit_blimp")
    assert len([k for k in res if k.startswith("kit_blimp_") and "/" not in k]) == 34
    assert all(res[k]["n"] == 3 for k in res if k.startswith("kit_blimp_") and "/" not in k)
    wt = res["kit_wikitext2"]
    assert wt["n"] == 3
    for m in ("word_perplexity", "byte_perplexity"):
        assert math.isfinite(wt[m]) and wt[m] > 1.0 and res[f"kit_wikitext2/{m}"] == wt[m]
    assert 0 < wt["bits_per_byte"] < 20


def test_evaluate_shipped_subset_all_tasks(tiny_model, tiny_tokenizer):
    res = evaluate(tiny_model, tiny_tokenizer, tasks=TOP_LEVEL, data_dir=str(SHIPPED_DATA_DIR), limit=2, batch_size=16)
    json.dumps(res, allow_nan=False)
    for name in TOP_LEVEL:
        assert name in res, name
    for name in ("kit_arc_easy", "kit_arc_challenge", "kit_piqa", "kit_hellaswag", "kit_openbookqa"):
        _check_acc(res, name)
        _check_acc(res, name, "acc_norm")
    for name in ("kit_blimp", "kit_boolq", "kit_copa", "kit_lambada", "kit_mmlu", "kit_rte", "kit_winogrande"):
        _check_acc(res, name)
    assert res["kit_mmlu_anatomy"]["n"] == 2 and "kit_mmlu_stem" in res
    assert math.isfinite(res["kit_lambada"]["perplexity"]) and res["kit_lambada"]["perplexity"] > 1
    assert res["kit_wikitext2"]["word_perplexity"] > 1


def test_task_name_errors(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"^tasks: unknown task 'kit_blimpp'; did you mean 'kit_blimp'\?.*kit_wikitext2") as ei:
        evaluate(tiny_model, tiny_tokenizer, tasks="kit_blimpp")
    assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match="did you mean 'kit_arc_easy'"):
        evaluate(tiny_model, tiny_tokenizer, tasks=["kit_arc_easyy"])
    with pytest.raises(FileNotFoundError, match="data_dir"):
        evaluate(tiny_model, tiny_tokenizer, data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate(tiny_model, None, tasks="kit_copa")

    # a data dir holding only part of the files: the kit shrinks to what is there
    (tmp_path / "blimp").mkdir()
    for p in ("causative", "wh_island"):
        shutil.copy(SHIPPED_DATA_DIR / "blimp" / f"{p}.jsonl", tmp_path / "blimp")
    assert list_kit_tasks(tmp_path) == ["kit_blimp"]
    assert render_tasks(tmp_path).groups["kit_blimp"] == ["kit_blimp_causative", "kit_blimp_wh_island"]
    with pytest.raises(FileNotFoundError, match=r"tasks: 'kit_arc_easy' needs arc_easy.jsonl"):
        evaluate(tiny_model, tiny_tokenizer, tasks="kit_arc_easy", data_dir=tmp_path)


def test_cli(tiny_model, tiny_tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "res.json"
    rc = cli_main(
        ["--model", str(model_dir), "--tasks", "kit_copa,kit_blimp_causative", "--limit", "4",
         "--data-dir", str(SHIPPED_DATA_DIR), "--output", str(out)]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["kit_copa"]["n"] == 4 and 0 <= res["kit_copa/acc"] <= 1
    assert "kit_blimp_causative/acc" in capsys.readouterr().out
    assert cli_main(["--model", str(model_dir), "--tasks", "kit_nope"]) == 2
    assert "unknown task 'kit_nope'" in capsys.readouterr().err


def test_evaluate_refuses_a_negative_few_shot_count_and_a_missing_gpu(tiny_model, tiny_tokenizer, monkeypatch):
    with pytest.raises(ValueError, match=r"num_fewshot must be a whole number >= 0"):
        evaluate(tiny_model, tiny_tokenizer, tasks="kit_copa", data_dir=SHIPPED_DATA_DIR, num_fewshot=-1)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device: cuda asked for, but torch sees no CUDA device"):
        evaluate(tiny_model, tiny_tokenizer, tasks="kit_copa", data_dir=SHIPPED_DATA_DIR, device="cuda")
