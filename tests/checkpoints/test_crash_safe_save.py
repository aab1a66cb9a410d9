"""Crash and race tests of save_pretrained over an existing sharded checkpoint (``crash_saver`` does the
forking): a save SIGKILLed before any of its file-system calls leaves a folder that loads as exactly the old
or exactly the new checkpoint, with the user's files intact, and the next save clears what it left; two saves
racing into one folder end as one of the two."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")


def _run(mode: str, folder: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.checkpoints.crash_saver", mode, str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_save_killed_at_every_point_leaves_old_or_new(tmp_path):
    reports = _run("kill", tmp_path / "ckpt")
    killed = [r for r in reports if r["killed"]]
    assert len(killed) >= 15, "a save over a sharded checkpoint makes many file-system calls"
    assert not reports[-1]["killed"] and reports[-1]["holds"] == "new"
    assert {r["holds"] for r in killed} == {"old", "new"}, [(r["k"], r["holds"]) for r in killed]
    for r in reports:
        assert r["user_files_intact"], r
        assert r["next_save_holds"] == "third" and r["leftovers"] == [], r


def test_racing_saves_end_as_one_of_the_two(tmp_path):
    reports = _run("race", tmp_path / "ckpt")
    assert len(reports) == 6
    for r in reports:
        assert r["exit_codes"] == [0, 0], r
        assert r["holds"] in ("a", "b") and r["user_files_intact"] and r["leftovers"] == [], r
