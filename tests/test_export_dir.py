"""Where an export may land: never over an existing folder, and nothing left behind by a failed write."""

from __future__ import annotations

import pytest

from diep_lightning.export_dir import atomic_directory


def test_export_never_overwrites_and_leaves_no_partial_dir(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="export_dir"):
        with atomic_directory(target, overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "new", overwrite=False) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "keep.txt").read_text() == "precious"


# ------------------------------------------------------------------ overwrite, concurrent runs, long names
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from diep_lightning.export_dir import MANIFEST, ExportLock, check_export_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _export(target, overwrite=False, keep_on_conflict=False):
    from helpers import non_uniform_scores

    from diep_lightning.export import export_pruned
    from diep_lightning.pipeline import prune
    from diep_lightning.testing import tiny_model

    model = tiny_model("mixtral")
    pruned = prune(model, non_uniform_scores(model), 0.25, "global")
    return export_pruned(pruned.model, pruned.plan, target, source="tiny", original=pruned.before,
                         overwrite=overwrite, keep_on_conflict=keep_on_conflict)[0]


def test_overwrite_replaces_only_what_an_export_wrote(tmp_path):
    target = _export(tmp_path / "out")
    listed = json.loads((target / MANIFEST).read_text())["files"]
    assert "pruning.json" in listed and "model.safetensors" in listed
    (target / "lm_eval.json").write_text("{}")  # written into an export later, by the lm-eval callback
    _export(target, overwrite=True)
    (target / "my_notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds my_notes.txt, which no export wrote"):
        _export(target, overwrite=True)
    assert (target / "my_notes.txt").read_text() == "mine"
    # a user's folder that merely has a pruning.json is not an export either
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "pruning.json").write_text("{}")
    (user / "thesis.txt").write_text("chapter 1")
    with pytest.raises(FileExistsError, match="holds thesis.txt"):
        check_export_dir(user, overwrite=True)
    assert sorted(p.name for p in user.iterdir()) == ["pruning.json", "thesis.txt"]


def test_a_run_that_finds_its_folder_taken_keeps_its_export_beside_it(tmp_path):
    taken = tmp_path / "out"
    taken.mkdir()
    (taken / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"this run's export is in .*out\.conflict-"):
        _export(taken, keep_on_conflict=True)
    kept = list(tmp_path.glob("out.conflict-*"))
    assert len(kept) == 1 and (kept[0] / "pruning.json").is_file()
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_one_run_at_a_time_holds_an_export_folder(tmp_path):
    first = ExportLock(tmp_path / "a" / "out").acquire()
    with pytest.raises(FileExistsError, match=r"^export_dir: another run \(pid \d+"):
        ExportLock(tmp_path / "a" / "out").acquire()
    first.release()
    ExportLock(tmp_path / "a" / "out").acquire().release()
    # a killed run's lock is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = ExportLock(tmp_path / "a" / "out")
    lock.path.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    lock.acquire().release()
    assert not lock.path.exists()


def test_a_name_too_long_for_the_hidden_partial_is_refused_before_anything(tmp_path):
    with pytest.raises(ValueError, match="^export_dir: the folder name is 240 characters"):
        check_export_dir(tmp_path / ("x" * 240), overwrite=False)
    check_export_dir(tmp_path / ("x" * 237), overwrite=False)


def test_two_real_runs_on_one_export_folder(tmp_path, tiny_mixtral_dir):
    """The second run to start is refused in one line while the first holds the folder; the first exports."""
    from helpers import fit_args

    export, go = tmp_path / "export", tmp_path / "go"
    common = [*fit_args(tiny_mixtral_dir, str(tmp_path / "logs")), "--trainer.logger=false",
              "--trainer.callbacks+=GlobalExpertPruning", f"--trainer.callbacks.export_dir={export}",
              "--trainer.callbacks.overwrite=true", "--trainer.callbacks.sparsity=0.25"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    # the first run waits mid-search (holding the lock) until the second has been answered
    first = subprocess.Popen([sys.executable, "-m", "diep_lightning", *common,
                              "--trainer.callbacks+=helpers.WaitForFile", f"--trainer.callbacks.path={go}"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = ExportLock(export)
    deadline = time.time() + 120
    while not lock.path.exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.2)
    try:
        second = subprocess.run([sys.executable, "-m", "diep_lightning", *common], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
    finally:
        go.touch()
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1].startswith("error: export_dir: another run (pid")
    assert (export / "pruning.json").is_file() and not lock.path.exists()
