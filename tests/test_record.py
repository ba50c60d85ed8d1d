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
