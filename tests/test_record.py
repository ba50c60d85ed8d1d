"""``pruning.json``: a record that disagrees with its export's config is refused."""

from __future__ import annotations

import json

import pytest

from helpers import plan_for

from diep_lightning import load_pruned
from diep_lightning.export import export_pruned
from diep_lightning.removal import apply_plan, size_report
from diep_lightning.testing import tiny_model


def test_mismatched_pruning_json_is_refused(tmp_path):
    model = tiny_model("mixtral")
    plan = plan_for(model, 0.375)
    sizes = size_report(model)
    apply_plan(model, plan)
    path, _ = export_pruned(model, plan, tmp_path / "e", source="tiny", original=sizes)
    record = json.loads((path / "pruning.json").read_text())
    record["layers"][0]["kept"] = record["layers"][0]["kept"][:-1]
    (path / "pruning.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="pruning.json"):
        load_pruned(path)


def test_a_huge_damaged_kept_list_gives_a_short_error_line():
    from diep_lightning.record import validate_record

    record = {"layers": [{"experts_before": 8, "kept": list(range(8)) * 250_000, "removed": []}]}
    with pytest.raises(ValueError) as err:
        validate_record(record, "pruning.json")
    message = str(err.value)
    assert len(message) < 300 and len(message.splitlines()) == 1 and "(2,000,000 ids)" in message, message[:300]
