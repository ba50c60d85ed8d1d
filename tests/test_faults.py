"""Faults: a search killed with SIGKILL resumes to the same result; the same seed gives the same pruning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import fit_args

from diep_lightning.main import main


def _args(model_dir, root, export, *extra, epochs=12):
    return fit_args(model_dir, str(root), "--trainer.callbacks+=GlobalExpertPruning",
                    "--trainer.callbacks.sparsity=0.5", f"--trainer.callbacks.export_dir={export}",
                    "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true",
                    f"--trainer.callbacks.dirpath={root}/ckpt", *extra, epochs=epochs)


def _kept(export) -> list[list[int]]:
    return [layer["kept"] for layer in json.loads((export / "pruning.json").read_text())["layers"]]


def _scores(ckpt_path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt_path, weights_only=False)["state_dict"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_mixtral_dir, tmp_path):
    straight = tmp_path / "straight"
    main(_args(tiny_mixtral_dir, straight, tmp_path / "export_straight"))

    killed = tmp_path / "killed"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])}
    # the run is held at the start of its third epoch (two checkpoints written) and killed there
    proc = subprocess.Popen([sys.executable, "-m", "diep_lightning",
                             *_args(tiny_mixtral_dir, killed, tmp_path / "export_killed"),
                             "--trainer.callbacks+=helpers.WaitForFile", f"--trainer.callbacks.path={tmp_path / 'never'}",
                             "--trainer.callbacks.epoch=2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    last = killed / "ckpt" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["epoch"] >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "export_killed").exists(), "a killed run must not leave an export"

    main(_args(tiny_mixtral_dir, killed, tmp_path / "export_killed", f"--ckpt_path={last}"))
    assert _kept(tmp_path / "export_killed") == _kept(tmp_path / "export_straight")
    a, b = _scores(straight / "ckpt" / "last.ckpt"), _scores(last)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_same_seed_same_pruning(tiny_mixtral_dir, tmp_path):
    for run in ("a", "b"):
        main(_args(tiny_mixtral_dir, tmp_path / run, tmp_path / f"export_{run}", epochs=3))
    assert _kept(tmp_path / "export_a") == _kept(tmp_path / "export_b")
    record_a = json.loads((tmp_path / "export_a" / "pruning.json").read_text())
    record_b = json.loads((tmp_path / "export_b" / "pruning.json").read_text())
    assert record_a["plan"]["scores"] == record_b["plan"]["scores"]


@pytest.mark.slow
def test_different_data_seed_changes_scores(tiny_mixtral_dir, tmp_path):
    main(_args(tiny_mixtral_dir, tmp_path / "a", tmp_path / "export_a", "--data.seed=1", epochs=3))
    main(_args(tiny_mixtral_dir, tmp_path / "b", tmp_path / "export_b", "--data.seed=2", epochs=3))
    a = json.loads((tmp_path / "export_a" / "pruning.json").read_text())["plan"]["scores"]
    b = json.loads((tmp_path / "export_b" / "pruning.json").read_text())["plan"]["scores"]
    assert a != b


def test_the_resume_fingerprint_sees_one_expert_scaled_in_the_middle_of_the_file(tmp_path):
    """A checkpoint resumed against a model whose weights changed mid-file is refused: the fingerprint samples
    blocks through every weight file, not only its ends."""
    import json as _json
    import shutil

    import numpy as np

    from diep_lightning.loading import fingerprint

    repo = Path(__file__).resolve().parents[1]
    model = tmp_path / "model"
    shutil.copytree(repo / "models" / "tiny-mixtral", model)
    before = fingerprint(str(model))
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = _json.loads(raw[8:8 + size])
    experts = [(v["data_offsets"], k) for k, v in header.items() if k != "__metadata__" and ".experts." in k]
    (start, end), name = min(experts, key=lambda item: abs(item[0][0] - len(raw) // 2))
    assert 1 << 20 < 8 + size + start < len(raw) - (1 << 20), "the tensor lies in the middle of the file"
    values = np.frombuffer(bytes(raw[8 + size + start:8 + size + end]), dtype=np.float32).copy()
    values *= 1.5  # one matrix of one expert
    raw[8 + size + start:8 + size + end] = values.tobytes()
    weights.write_bytes(bytes(raw))
    assert fingerprint(str(model)) != before, name
