"""The benchmark runs end to end on a tiny random model with small limits and writes its report."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from benchmarks import run as bench
from benchmarks.files import run_json

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tiny_mixtral_dir, tmp_path):
    out = tmp_path / "bench"
    results = bench.main(["--models", tiny_mixtral_dir, "--seeds", "0", "--limit", "2", "--epochs", "1",
                          "--num-samples", "8", "--seq-len", "32", "--batch-size", "4", "--new-tokens", "4",
                          "--evo-population", "3", "--evo-generations", "2", "--out", str(out)])
    res = next(iter(results["models"].values()))
    assert {"diep", "diep_uniform", "diep_merge", "diep_skip", "random", "frequency", "reap", "naee",
            "reap_global_norm", "evo", "ablation", "greedy"} <= set(res["quality"])
    for method in ("evo", "greedy", "ablation", "reap_global_norm"):
        for sparsity in ("0.25", "0.5"):
            entry = res["quality"][method][sparsity][0]
            assert sum(entry["kept_per_layer"]) == 16 - round(float(sparsity) * 16), (method, entry)
    for method in bench.COST_ROWS:  # every allocator and reference has its search cost beside the floor's
        assert res["cost"][method]["wall_s"] > 0, res["cost"][method]
    assert res["decode"]["pruned_50"]["expert_bytes"] < res["decode"]["full"]["expert_bytes"]
    report = (out / "RESULTS.md").read_text()
    assert "| diep | 0.5 |" in report and "Search cost" in report
    assert "| diep_evo | " in report.split("Search cost")[1] and "| greedy_lazy | " in report.split("Search cost")[1]
    assert "kit_blimp_stderr" in res["full"] and " (se " in report  # every quality figure carries its uncertainty
    # router calibration after DiEP, merging and the strongest rivals, each beside the same pruning without it
    assert set(bench.CALIBRATED_ROWS) <= set(res["quality"])
    recorded = res["quality"]["diep_cal"]["0.5"][0]["router_calibration"]
    assert recorded["heldout_kl_after"] <= recorded["heldout_kl_before"] and recorded["steps_run"] >= 1
    assert "## Router calibration: what it gives back" in report and "| evo (generated) | " in report.split("gives back")[1]
    assert "the calibration stage takes" in report
    # each document's figure is kept, so DiEP is compared with every method on the same documents
    pairs = res["full"]["per_document"]["kit_blimp"]
    assert len(pairs) > 34 and abs(sum(pairs) / len(pairs) - res["full"]["kit_blimp"]) < 1e-9
    assert "## DiEP against each method, paired" in report and "% | evo | " in report
    # the targets are computed from the run, so a re-run never loses them
    assert "## Where each target stands" in report and "DiEP search" in report and "decode full_skip" in report
    assert json.loads(run_json(out).read_text())["models"]
    # the report names the checkpoint it measured, so a retrained model shows the report is stale
    sha = hashlib.sha256((Path(tiny_mixtral_dir) / "model.safetensors").read_bytes()).hexdigest()
    assert res["checkpoint_sha256"] == sha and f"sha256 `{sha[:16]}" in report

    # --combine merges runs and keeps, per model, the command that measured it
    other = json.loads(run_json(out).read_text())
    other["command"], other["models"] = "python -m benchmarks.run --seeds 1", {"copy": res}
    run_json(tmp_path / "other").parent.mkdir(parents=True)
    run_json(tmp_path / "other").write_text(json.dumps(other))
    merged = bench.main(["--combine", f"{out},{tmp_path / 'other'}", "--out", str(tmp_path / "merged")])
    assert set(merged["models"]) == {next(iter(results["models"])), "copy"}
    merged_report = (tmp_path / "merged" / "RESULTS.md").read_text()
    assert f"Measured by: `python -m benchmarks.run --seeds 1` on {res['machine']}." in merged_report
    assert f"Measured by: `{results['command']}` on " in merged_report and "CPU cores" in res["machine"]
    assert list(out.glob("quality_vs_sparsity_*.png"))
    # the hand-kept summary at the top of RESULTS.md survives a rewrite, once and on top
    summary = "<!-- today:begin -->\n## What holds today\n\n- a line\n<!-- today:end -->"
    (tmp_path / "merged" / "RESULTS.md").write_text(merged_report.replace("\n", "\n\n" + summary + "\n", 1))
    bench.main(["--combine", f"{out},{tmp_path / 'other'}", "--out", str(tmp_path / "merged")])
    again = (tmp_path / "merged" / "RESULTS.md").read_text()
    assert again.count("<!-- today:begin -->") == 1 and "- a line" in again
    assert again.index("<!-- today:begin -->") < again.index("## copy")

    # a later folder's section replaces an earlier one's, and the replaced run leaves the merged command
    newer = {**other, "command": "python -m benchmarks.run --seeds 2"}
    run_json(tmp_path / "newer").parent.mkdir(parents=True)
    run_json(tmp_path / "newer").write_text(json.dumps(newer))
    remerged = bench.main(["--combine", f"{tmp_path / 'merged'},{tmp_path / 'newer'}", "--out", str(tmp_path / "re")])
    assert remerged["models"]["copy"]["measured_by"] == "python -m benchmarks.run --seeds 2"
    assert "--seeds 1" not in remerged["command"] and results["command"] in remerged["command"]

    # a run of the timed phases only adds its cost and decode tables to the quality run's section
    name = next(iter(results["models"]))
    timed = {**other, "command": "python -m benchmarks.run --phases cost,decode",
             "models": {name: {"full": {}, "quality": {}, "decode": {},
                               "cost": {"floor": {"wall_s": 2.0, "peak_rss_mb": 10.0},
                                        "diep": {"wall_s": 3.0, "peak_rss_mb": 12.0}}}}}
    run_json(tmp_path / "timed").parent.mkdir(parents=True)
    run_json(tmp_path / "timed").write_text(json.dumps(timed))
    joined = bench.main(["--combine", f"{out},{tmp_path / 'timed'}", "--out", str(tmp_path / "joined")])
    section = joined["models"][name]
    assert section["quality"] == res["quality"] and section["cost"] == timed["models"][name]["cost"]
    assert section["decode"] == res["decode"] and section["measured_by"].endswith("--phases cost,decode")

    # a run of some quality rows (--methods) adds them to the earlier run's section; DiEP refined by evo keeps the
    # budget, and the lazy greedy search is compared with the exact one
    rows = bench.main(["--models", tiny_mixtral_dir, "--seeds", "0", "--limit", "2", "--epochs", "1",
                       "--num-samples", "8", "--seq-len", "32", "--batch-size", "4", "--phases", "quality",
                       "--methods", "diep_evo,greedy,greedy_lazy", "--evo-population", "3", "--evo-generations", "2",
                       "--out", str(tmp_path / "rows")])["models"][name]
    assert set(rows["quality"]) == {"diep_evo", "greedy", "greedy_lazy"} and rows["rows"]
    for sparsity in ("0.25", "0.5"):
        assert sum(rows["quality"]["diep_evo"][sparsity][0]["kept_per_layer"]) == 16 - round(float(sparsity) * 16)
    assert rows["reference_evaluations"]["greedy_lazy"] < rows["reference_evaluations"]["greedy"]
    assert rows["greedy_lazy_same_order"]["removals"] == 8
    added = bench.main(["--combine", f"{out},{tmp_path / 'rows'}", "--out", str(tmp_path / "added")])["models"][name]
    assert set(added["quality"]) == set(res["quality"]) | {"diep_evo", "greedy_lazy"}
    assert added["quality"]["diep"] == res["quality"]["diep"] and "greedy_lazy" in added["reference_evaluations"]
    assert "| diep_evo | 0.5 |" in (tmp_path / "added" / "RESULTS.md").read_text()


def test_an_interrupted_run_resumes_the_parts_it_finished(tiny_mixtral_dir, tiny_qwen_dir, tmp_path):
    """A multi-hour run can go on where it stopped: finished parts of the same settings are reused, not rerun."""
    out = tmp_path / "bench"
    small = ["--seeds", "0", "--limit", "2", "--blimp-limit", "1", "--wikitext-limit", "1", "--epochs", "1",
             "--num-samples", "8", "--seq-len", "32", "--batch-size", "4", "--new-tokens", "2",
             "--methods", "frequency", "--out", str(out)]
    args = ["--models", f"{tiny_mixtral_dir},{tiny_qwen_dir}", "--jobs", "2", "--phases", "quality,cost", *small]
    first = bench.main(args)
    names = list(first["models"])
    assert names == [Path(tiny_mixtral_dir).name, Path(tiny_qwen_dir).name] and not first["resumed"]
    for name in names:
        assert first["models"][name]["quality"]["frequency"] and first["models"][name]["cost"]["frequency"]["wall_s"] > 0
    # mark one model's finished parts: a resumed run must take them as they are, and measure the other model anew
    part = out / f".part_{names[0]}"
    quality = json.loads(run_json(part).read_text())
    quality["models"][names[0]]["full"]["marker"] = 1
    run_json(part).write_text(json.dumps(quality))
    timed = json.loads((part / "timed.json").read_text())
    timed["models"][names[0]]["cost"]["floor"]["wall_s"] = 12345.0
    (part / "timed.json").write_text(json.dumps(timed))
    (out / f".part_{names[1]}" / "timed.json").unlink()  # as if the run had stopped before this model's cost
    second = bench.main([*args, "--resume"])
    assert second["models"][names[0]]["full"]["marker"] == 1
    assert second["models"][names[0]]["cost"]["floor"]["wall_s"] == 12345.0
    assert second["models"][names[1]]["cost"]["floor"]["wall_s"] != first["models"][names[1]]["cost"]["floor"]["wall_s"]
    assert second["resumed"] == [f"{names[0]} quality", f"{names[1]} quality", f"{names[0]} cost"]
    assert "Resumed (`--resume`)" in (out / "RESULTS.md").read_text()
    # other settings are another run: nothing is reused
    third = bench.main(["--models", tiny_mixtral_dir, *small, "--phases", "quality", "--limit", "3", "--resume"])
    assert not third["resumed"] and "marker" not in third["models"][names[0]]["full"]


def test_a_part_written_before_an_option_existed_resumes_only_at_its_default(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.DEFAULTS, "new_option", 7)
    part = tmp_path / "results.json"
    part.write_text(json.dumps({"args": {"limit": 100, "phases": ["quality"], "out": "elsewhere"}, "models": {}}))
    args = lambda **kw: __import__("argparse").Namespace(limit=100, phases=["quality"], out="here", **kw)  # noqa: E731
    assert bench.finished_part(part, args(new_option=7), ["quality"]) is not None
    assert bench.finished_part(part, args(new_option=8), ["quality"]) is None
    assert bench.finished_part(part, args(new_option=7), ["quality", "cost"]) is None
    assert bench.finished_part(tmp_path / "missing.json", args(new_option=7), ["quality"]) is None


def test_benchmark_rejects_unknown_phase(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench.main(["--phases", "quality,speed", "--out", str(tmp_path)])
    assert "--phases" in capsys.readouterr().err


def test_speed_benchmark_smoke(tmp_path):
    from benchmarks import speed

    results_md = tmp_path / "RESULTS.md"
    results = speed.main(["--shapes", "mixtral,qwen3", "--dtypes", "float32", "--layers", "1", "--hidden", "64",
                          "--vocab", "64", "--repeats", "2", "--new-tokens", "2", "--prefill-tokens", "16",
                          "--threads", "1", "--out", str(tmp_path / "speed.json"), "--results", str(results_md)])
    for key in ("mixtral float32", "qwen3 float32"):
        run = results["runs"][key]
        assert set(run["summary"]) == set(speed.VARIANTS)
        assert all(m["ratio"] == 1.0 for m in run["summary"]["full"].values())  # full against itself, per round
        assert all(len(v) == 2 for v in run["times"]["pruned_50_skip"].values())
        facts = run["facts"]
        assert facts["pruned_50"]["expert_bytes"] * 2 == facts["full"]["expert_bytes"]
        assert facts["pruned_25"]["expert_bytes"] * 4 == facts["full"]["expert_bytes"] * 3
        assert all(0.0 <= f["skipped_share"] < 1.0 for f in facts.values())
        for f in facts.values():  # the share skipped in the timed decode steps, counted apart from the prefill
            assert set(f["decode_skipped_share"]) == {"decode_1", "decode_16"}
            assert all(0.0 <= x < 1.0 for x in f["decode_skipped_share"].values())
    text = results_md.read_text()
    assert "<!-- speed_cpu:begin -->" in text and "| pruned_50_skip |" in text
    # a stronger skipping writes its own section, beside the paper's, and skips more of the same model
    stronger = speed.main(["--shapes", "mixtral", "--dtypes", "float32", "--layers", "1", "--hidden", "64",
                           "--vocab", "64", "--repeats", "1", "--new-tokens", "2", "--prefill-tokens", "16",
                           "--threads", "1", "--skip-strength", "3", "--out", str(tmp_path / "speed3.json"),
                           "--results", str(results_md)])
    shares = [r["runs"]["mixtral float32"]["facts"]["full"]["skipped_share"] for r in (results, stronger)]
    assert shares[1] > shares[0]
    text = results_md.read_text()
    assert "<!-- speed_cpu:begin -->" in text and "<!-- speed_cpu_strength_3:begin -->" in text
    assert "skipping strength 3" in text
    # a share instead of a strength: the strength that skips that share of the slots is found per model
    by_share = speed.main(["--shapes", "mixtral", "--dtypes", "float32", "--layers", "1", "--hidden", "64",
                           "--vocab", "64", "--repeats", "1", "--new-tokens", "2", "--prefill-tokens", "16",
                           "--threads", "1", "--skip-share", "0.3", "--out", str(tmp_path / "speed_share.json"),
                           "--results", str(results_md)])
    for facts in by_share["runs"]["mixtral float32"]["facts"].values():
        assert abs(facts["skipped_share"] - 0.3) < 0.02
    assert "<!-- speed_cpu_share_0_3:begin -->" in results_md.read_text()
    # several shares side by side: one model copy per share, each judged by skipping alone's targets
    side = speed.main(["--shapes", "mixtral", "--dtypes", "float32", "--layers", "1", "--hidden", "64",
                       "--vocab", "64", "--repeats", "2", "--new-tokens", "2", "--prefill-tokens", "16",
                       "--threads", "1", "--skip-shares", "0.2,0.4", "--out", str(tmp_path / "speed_shares.json"),
                       "--results", str(results_md)])
    run = side["runs"]["mixtral float32"]
    assert run["variants"] == ["full", "share_0.2_skip", "share_0.4_skip"] == list(run["summary"])
    assert [round(run["facts"][n]["skipped_share"], 1) for n in ("share_0.2", "share_0.4")] == [0.2, 0.4]
    section = results_md.read_text().split("<!-- speed_cpu_shares:begin -->")[1]
    assert "share_0.4_skip decode b=1" in section and "| pruned_50 |" not in section


def test_the_real_models_layers_write_their_own_section(tmp_path):
    from benchmarks import speed

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("<!-- speed_cpu:begin -->\nthe narrower shapes' section\n<!-- speed_cpu:end -->\n")
    results = speed.main(["--shapes", "mixtral-8x7b,qwen3-30b-a3b", "--dtypes", "bfloat16", "--layers", "1",
                          "--hidden", "64", "--vocab", "64", "--repeats", "1", "--new-tokens", "2",
                          "--prefill-tokens", "16", "--threads", "1", "--out", str(tmp_path / "fw.json"),
                          "--results", str(results_md)])
    assert set(results["runs"]) == {"mixtral-8x7b bfloat16", "qwen3-30b-a3b bfloat16"}
    text = results_md.read_text()
    assert "the narrower shapes' section" in text  # not replaced: its own section
    section = text.split("<!-- speed_cpu_full_width_bfloat16:begin -->")[1]
    assert "scaled to hidden 64" in section and "### qwen3-30b-a3b bfloat16" in section
    assert speed.section_name(results) == "speed_cpu_full_width_bfloat16"


def test_search_cost_benchmark_smoke(tmp_path):
    from benchmarks import search_cost

    results_md = tmp_path / "RESULTS.md"
    results = search_cost.main(["--sizes", "32x1,64x1", "--vocab", "64", "--samples", "4", "--seq-len", "16",
                                "--batch-size", "2", "--epochs", "2", "--threads", "1", "--repeats", "2",
                                "--out", str(tmp_path / "cost.json"), "--results", str(results_md)])
    assert [r["size"] for r in results["rows"]] == ["32x1", "64x1"]
    assert results["rows"][1]["params"] > results["rows"][0]["params"]
    for row in results["rows"]:
        assert row["floor"]["wall_s"] > 0 and row["diep"]["wall_s"] > 0
        assert row["diep"]["teacher_cache_mb"] > 0  # the cache filled in the first epoch
        assert len(row["runs"]["floor"]) == len(row["runs"]["diep"]) == 2
        assert row["wall_ratio"]["min"] <= row["wall_ratio"]["median"] <= row["wall_ratio"]["max"]
        for kind in ("floor", "diep"):  # the training loop is timed apart from start-up and set-up
            assert all(0 < r["loop_s"] < r["wall_s"] for r in row["runs"][kind])
        assert row["loop_ratio"]["min"] <= row["loop_ratio"]["median"] <= row["loop_ratio"]["max"]
    assert "loop x floor" in results_md.read_text()
    assert set(results["projection"]) == {"Mixtral-8x7B", "Qwen3-30B-A3B"}
    for p in results["projection"].values():  # the shipped configs keep the teacher cache, in host memory
        assert p["cache_used"] and p["cache_device"] == "cpu" and p["teacher_cache_gb"] <= p["cache_limit_gb"]
        assert p["search_over_floor"] >= p["measured_ratio"] and p["copy_gb_per_step"] > 0
    assert "<!-- search_cost:begin -->" in results_md.read_text()
    # the section re-renders from the json alone, measuring nothing
    again = search_cost.main(["--from", str(tmp_path / "cost.json"), "--results", str(tmp_path / "again.md")])
    assert again["projection"] == results["projection"] and "| 64x1 |" in (tmp_path / "again.md").read_text()


def test_paired_bootstrap_verdicts():
    same = [1.0, 0.0, 1.0, 1.0, 0.0] * 20
    point, low, high = bench.paired_bootstrap(same, same, "kit_blimp")
    assert (point, low, high) == (0.0, 0.0, 0.0) and bench.verdict("kit_blimp", low, high) == "within noise"
    better = [1.0] * 90 + [0.0] * 10
    worse = [1.0] * 40 + [0.0] * 60
    point, low, high = bench.paired_bootstrap(better, worse, "kit_blimp")
    assert abs(point - 0.5) < 1e-12 and low > 0 and bench.verdict("kit_blimp", low, high) == "better"
    assert bench.verdict("kit_blimp", *bench.paired_bootstrap(worse, better, "kit_blimp")[1:]) == "worse"
    # perplexity documents are [loglikelihood, words]; the ratio is exp of the per-word loglikelihood gap
    a = [[-100.0 * (1 + i % 3), 50.0] for i in range(12)]
    b = [[d[0] - 10.0, 50.0] for d in a]  # B loses 10 nats per 50-word article everywhere
    point, low, high = bench.paired_bootstrap(a, b, "kit_wikitext2")
    assert abs(point - __import__("math").exp(-0.2)) < 1e-9 and high < 1
    assert bench.verdict("kit_wikitext2", low, high) == "better"


def test_the_skipping_target_line_says_when_a_miss_is_within_noise():
    def section(skip_docs: list[float]) -> str:
        diep = [1.0] * 60 + [0.0] * 40
        entry = lambda docs: [{"seed": 0, "metrics": {"kit_blimp": sum(docs) / len(docs),  # noqa: E731
                                                      "per_document": {"kit_blimp": docs}}}]
        res = {"full": {"kit_wikitext2": 10.0, "kit_blimp": 0.6}, "cost": {},
               "quality": {"diep": {"0.25": entry(diep)}, "diep_skip": {"0.25": entry(skip_docs)}}}
        line = [x for x in bench.targets_section({"models": {"m": res}}) if "BLiMP lost to skipping" in x]
        return line[0]

    # two pairs of 100 flip: 2 points lost, but a paired interval that reaches the 1-point target
    noisy = section([1.0] * 58 + [0.0] * 42)
    assert "+2.0 points" in noisy and "missed" in noisy and "within noise of the target" in noisy
    # twenty pairs flip the same way: a loss no resampling explains away
    clear = section([1.0] * 40 + [0.0] * 60)
    assert "+20.0 points" in clear and "missed" in clear and "within noise" not in clear
    assert "met (95% paired interval" in section([1.0] * 60 + [0.0] * 40)


def test_skipping_bounds_from_the_profile(tmp_path):
    """The bounds follow from the profile: half the expert matrices left unused with the experts taking all the
    time would double speed if decode streams weights; a quarter of slots skipped gives 4/3 if it computes."""
    from benchmarks import speed

    entry = {"facts": {"full": {"skipped_share": 0.25}},
             "profile": {"full": {"decode_1": {"experts_time_share": 1.0, "experts_used_share": 0.5}},
                         "full_skip": {"decode_1": {"experts_time_share": 1.0, "experts_used_share": 0.25}}}}
    bounds = speed.skipping_bounds(entry, "decode_1")
    assert abs(bounds["weights"] - 2.0) < 1e-9 and abs(bounds["compute"] - 4 / 3) < 1e-9
    assert "matmuls" not in bounds  # a profile from before the matmuls were timed
    assert speed.skipping_bounds(entry, "decode_16") is None
    # with the matmuls timed: only their 60% of the time shrinks with the matrices used, and skipping's own work
    # outside them (0.25 s against 0.2 s of a 1 s full decode) shows as +5% of the full model's time
    entry["profile"]["full"]["decode_1"].update(matmul_time_share=0.6, total_s=1.0, experts_time_share=0.8)
    entry["profile"]["full_skip"]["decode_1"].update(matmul_time_share=0.5, total_s=0.6, experts_time_share=0.5 + 0.25 / 0.6)
    bounds = speed.skipping_bounds(entry, "decode_1")
    assert abs(bounds["matmuls"] - 1 / (1 - 0.6 * 0.5)) < 1e-9 and abs(bounds["overhead"] - 0.05) < 1e-9
    assert "+5.0% of the full model's time" in speed.bounds_note(entry, "full_skip", "decode_1")
    assert "any_share" not in bounds  # a profile from before the top experts alone were counted
    # the top experts alone use 0.3 of the matrices against the full model's 0.5: at any share, 0.4 of the matmuls'
    # 60% of the time can go
    entry["profile"]["full"]["decode_1"]["top_only_used_share"] = 0.3
    assert speed.skipping_bounds(entry, "decode_1")["any_share"] == pytest.approx(1 / (1 - 0.6 * 0.4))
    assert "at any share, weights-bound: 1.32x" in speed.bounds_note(entry, "full_skip", "decode_1")


def test_slow_bf16_is_flagged_only_where_bf16_prefill_is_slower():
    from benchmarks import speed

    def run(prefill):
        return {"summary": {"full": {"prefill": {"tps": prefill}}}}

    slow = {"runs": {"mixtral float32": run(500.0), "mixtral bfloat16": run(100.0)}}
    assert "0.20x fp32" in " ".join(speed.slow_bf16_lines(slow))
    fast = {"runs": {"mixtral float32": run(500.0), "mixtral bfloat16": run(2500.0)}}
    assert speed.slow_bf16_lines(fast) == []


def test_skip_strength_benchmark_smoke(tmp_path):
    """The quality-against-strength benchmark on a shipped model, with the DiEP scores the committed run saved:
    a stronger skipping skips more, and the section says where the BLiMP target stands."""
    from benchmarks import skip_strength

    results_md = tmp_path / "RESULTS.md"
    results = skip_strength.main(["--models", str(REPO / "models" / "tiny-mixtral"), "--sparsities", "0.5",
                                  "--strengths", "1,2", "--blimp-limit", "1", "--wikitext-limit", "1",
                                  "--num-samples", "8", "--seq-len", "64", "--batch-size", "4", "--jobs", "1",
                                  "--out", str(tmp_path / "s.json"), "--results", str(results_md)])
    strengths = results["models"]["tiny-mixtral"]["0.5"]["strengths"]
    assert 0 < strengths["1.0"]["skipped_share"] < strengths["2.0"]["skipped_share"] <= 0.5
    text = results_md.read_text()
    assert "<!-- skip_strength:begin -->" in text and "- strength 2: BLiMP lost at most" in text
    with pytest.raises(SystemExit):
        skip_strength.main(["--strengths", "1,-2"])


def test_skip_overhead_benchmark_smoke(tmp_path, capsys):
    """The overhead-bound skipping benchmark on a shipped model: both skipping paths timed against none, the lean
    one adding fewer operations per MoE layer; a bad model path is refused in one line."""
    from benchmarks import skip_overhead

    results_md = tmp_path / "RESULTS.md"
    results = skip_overhead.main(["--models", str(REPO / "models" / "tiny-mixtral"), "--rounds", "1",
                                  "--new-tokens", "2", "--out", str(tmp_path / "o.json"), "--results", str(results_md)])
    res = results["models"]["tiny-mixtral"]
    assert 0 < res["skipped_share"] < 0.5
    assert all(0 <= x < 1 for x in res["decode_skipped_share"].values())
    assert 0 < res["ops_per_layer"]["lean"] < res["ops_per_layer"]["sentinel"]
    assert set(res["summary"]) == {"off", "lean", "sentinel"} and res["summary"]["lean"]["batch_16"]["tps"] > 0
    assert "<!-- skip_overhead:begin -->" in results_md.read_text()
    again = tmp_path / "again.md"  # a run elsewhere (a GPU's) is rendered here from its JSON
    skip_overhead.main(["--from", str(tmp_path / "o.json"), "--results", str(again)])
    assert again.read_text() == results_md.read_text()
    with pytest.raises(SystemExit):
        skip_overhead.main(["--models", str(tmp_path / "nothing")])
    assert "--models: no model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        skip_overhead.main(["--paths", "lean,fast"])
    assert "--paths: choose from" in capsys.readouterr().err


def test_a_compiled_decode_step_with_skipping_is_one_graph_and_decodes_as_eager():
    """The speed benchmarks' --compile path: generate compiles the decode step with skipping installed, on the CPU
    too, without a graph break, and greedy tokens equal eager decoding's with the same skipping."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from benchmarks import skip_overhead, speed
    from diep_lightning.skipping import calibrate_skipping

    config = torch._dynamo.config
    saved = config.recompile_limit, config.automatic_dynamic_shapes
    try:  # restored by assignment: pytest's monkeypatch deletes (hides) a torch config entry on undo
        speed.compile_decoding()
        model = AutoModelForCausalLM.from_pretrained(REPO / "models" / "tiny-mixtral").eval()
        skipping = calibrate_skipping(model, skip_overhead.calibration_batches(model.config.vocab_size))
        assert 0 < sum(skipping.skipped_fraction.values())
        prompt = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
        kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
        eager = model.generate(prompt, **kwargs)
        torch._dynamo.reset()
        counters.clear()
        compiled = model.generate(prompt, **kwargs, **speed.compiled_generation())
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
        assert torch.equal(compiled, eager)
    finally:
        config.recompile_limit, config.automatic_dynamic_shapes = saved


def test_the_gpu_check_script_parses_and_refuses_a_machine_without_a_gpu(tmp_path):
    """tools/gpu_checks.sh, the one command a lent GPU runs: valid bash, and on a machine without a GPU it stops in
    one line before any step."""
    import os
    import subprocess

    script = REPO / "tools" / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
                                                                         "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 1 and "torch sees no GPU" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "steps.log").exists()
    wrong = subprocess.run(["bash", str(script), "--sped"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert wrong.returncode == 2 and "unknown argument '--sped'" in wrong.stderr


@pytest.mark.parametrize("gamma, share", [(1e9, 0.5), (0.0, 0.0)])
def test_the_decode_skipped_share_counts_the_decode_steps(gamma, share):
    """Top-2 routing with every non-top slot skipped skips half the decode steps' slots, none with no threshold;
    counted without the prefill's slots."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks import speed
    from diep_lightning.families import get_family
    from diep_lightning.skipping import install_skipping

    model = AutoModelForCausalLM.from_pretrained(REPO / "models" / "tiny-mixtral").eval()
    blocks = get_family(model).blocks(model)
    model.diep_skipping = install_skipping(model, {b.index: torch.full((8, 8), gamma) for b in blocks})
    assert speed.decode_skipped_share(model, 2, 4, torch.device("cpu")) == share
    assert speed.decode_skipped_share(model, 1, 3, torch.device("cpu"), seeds=(5, 6, 7)) == share
    assert not model.diep_skipping.counting and model.diep_skipping.stats[blocks[0].index] == [0, 0]


def test_the_decode_rate_times_the_decode_steps_alone(monkeypatch):
    """The clock's window opens after the prompt's prefill forward and holds exactly new_tokens - 1 forwards (the
    decode steps), so the prompt's prefill is not in a variant's decode rate; one token gives no rate."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks import speed

    model = AutoModelForCausalLM.from_pretrained(REPO / "models" / "tiny-mixtral").eval()
    clocks, events = [], []
    stock = speed.DecodeClock

    class Recording(stock):
        def __init__(self, *args):
            super().__init__(*args)
            clocks.append(self)

    monkeypatch.setattr(speed, "DecodeClock", Recording)
    model.register_forward_hook(lambda m, a, kw, out: events.append((kw["input_ids"].shape[1], clocks[-1].calls)),
                                with_kwargs=True)
    rate = speed.decode_tps(model, 2, 5, torch.device("cpu"), prompt_len=6, seed=3)
    assert rate > 0 and len(clocks[0].marks) == 2
    assert events[0] == (6, 0)  # the prefill ran before the window opened
    assert [calls for _, calls in events[1:]] == [1, 2, 3, 4]  # four decode steps inside it, one token each
    assert all(length == 1 for length, _ in events[1:])
    with pytest.raises(ValueError, match="new_tokens"):
        speed.decode_tps(model, 1, 1, torch.device("cpu"))


def test_expert_matmul_times_each_rows_setting_and_refuses_bad_rows(tmp_path, capsys):
    """A tiny run times every rows setting per dtype into JSON and a RESULTS.md section, re-renders from that JSON,
    and stops in one line (no traceback) on rows it cannot time."""
    from benchmarks import expert_matmul

    results_md = tmp_path / "RESULTS.md"
    out = tmp_path / "em.json"
    results = expert_matmul.main(["--hidden", "64", "--rows", "1,4", "--pool-mb", "1", "--repeats", "2",
                                  "--dtypes", "float32,bfloat16", "--out", str(out), "--results", str(results_md)])
    assert set(results["runs"]) == {f"{d} {k}" for d in ("float32", "bfloat16") for k in ("grouped", "loop")}
    for run in results["runs"].values():
        assert set(run["seconds"]) == {"1", "4"} and all(s > 0 for s in run["seconds"].values())
        assert run["layers"] >= 2
    for batch, steps in ((1, 1), (16, 16)):
        hist = results["routing"][f"batch_{batch}"]
        entries = {name: sum(h.values()) for name, h in hist.items()}
        rows = {name: sum(int(r) * c for r, c in h.items()) for name, h in hist.items()}
        assert entries["off"] == entries["on"] == 4 * 31 * 5 * 8  # layers x decode steps x prompts x experts
        assert rows["off"] == 4 * 31 * 5 * steps * 2 > rows["on"] >= 4 * 31 * 5 * steps  # top-2; the top slot stays
    text = results_md.read_text()
    assert "<!-- expert_matmul:begin -->" in text and "| float32 loop |" in text and "4 rows take" in text
    assert "What that predicts for skipping" in text
    results_md.write_text("")
    assert expert_matmul.main(["--from", str(out), "--results", str(results_md)]) == json.loads(out.read_text())
    assert "| bfloat16 grouped |" in results_md.read_text()
    for bad in (["--rows", "0,2"], ["--rows", "a"], ["--dtypes", "int8"], ["--kernels", "cublas"]):
        with pytest.raises(SystemExit):
            expert_matmul.main(bad + ["--results", ""])
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith("python -m benchmarks.expert_matmul: error: --")
        assert "Traceback" not in err


def test_the_rows_note_tells_a_weight_bound_kernel_from_a_growing_one():
    from benchmarks.expert_matmul import rows_note

    assert "reading the weights bounds" in rows_note({"seconds": {"1": 1.0, "4": 1.05}})
    assert "grows with rows" in rows_note({"seconds": {"1": 1.0, "4": 2.0}})
    assert rows_note({"seconds": {"2": 1.0}}) == ""


def test_the_profile_counts_the_decode_steps_alone():
    """With every non-top slot skipped, each batch-1 decode step uses exactly one expert per layer: the used share is
    1/N only if the prompt's prefill (8 tokens, several experts) stays out, over every prompt given."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks import speed
    from diep_lightning.families import get_family
    from diep_lightning.skipping import install_skipping

    model = AutoModelForCausalLM.from_pretrained(REPO / "models" / "tiny-mixtral").eval()
    blocks = get_family(model).blocks(model)
    n = model.config.num_local_experts
    model.diep_skipping = install_skipping(model, {b.index: torch.full((n, n), 1e9) for b in blocks})
    prof = speed.profile(model, 1, 4, torch.device("cpu"), seeds=(1, 2))
    assert prof["experts_used_share"] == 1 / n
    assert 0 < prof["experts_time_share"] < 1 and prof["decode_steps_only"]
    # at batch 4 the top experts alone are the floor: skipping every non-top slot reaches it exactly, no skipping
    # stays above it (the second choices add experts no token ranks first)
    skipped = speed.profile(model, 4, 4, torch.device("cpu"), seeds=(1, 2))
    assert skipped["experts_used_share"] == skipped["top_only_used_share"]
    with model.diep_skipping.disabled():
        unskipped = speed.profile(model, 4, 4, torch.device("cpu"), seeds=(1, 2))
    assert unskipped["experts_used_share"] > unskipped["top_only_used_share"] >= 1 / n


def test_the_matmul_curve_costs_rows_by_interpolation():
    from benchmarks.expert_matmul import matmul_seconds, predicted_gain

    curve = {"1": 1.0, "4": 2.0}
    assert matmul_seconds(curve, 0) == 0.0 and matmul_seconds(curve, 1) == 1.0
    assert matmul_seconds(curve, 2) == pytest.approx(4 / 3) and matmul_seconds(curve, 6) == pytest.approx(8 / 3)
    assert predicted_gain(curve, {"off": {"4": 2}, "on": {"1": 1, "4": 1}}) == pytest.approx(4 / 3)


def test_cka_cost_times_both_forms_and_they_agree(tmp_path, capsys):
    from benchmarks import cka_cost

    results_md = tmp_path / "RESULTS.md"
    results = cka_cost.main(["--shapes", "mixtral,qwen3", "--tokens", "16", "--feature-experts", "3", "--threads", "1",
                             "--out", str(tmp_path / "cka.json"), "--results", str(results_md)])
    mixtral, qwen3 = results["runs"]["mixtral"], results["runs"]["qwen3"]
    assert (mixtral["experts"], qwen3["experts"]) == (8, 64) and mixtral["feature_experts_timed"] == 3
    assert all(r["max_difference"] < 1e-5 and r["token_gram_s"] > 0 and r["feature_s"] > 0 for r in (mixtral, qwen3))
    section = results_md.read_text().split("<!-- cka_cost:begin -->")[1]
    assert "| qwen3 | 64 | 1024 | 16 |" in section and "(from 3 experts' pairs)" in section
    again = tmp_path / "again.md"
    assert cka_cost.main(["--from", str(tmp_path / "cka.json"), "--results", str(again)]) == results
    with pytest.raises(SystemExit):
        cka_cost.main(["--shapes", "mixtrel"])
    assert "--shapes: unknown ['mixtrel']" in capsys.readouterr().err
