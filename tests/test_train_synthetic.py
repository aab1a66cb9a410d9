"""The main demo: its synthetic tasks are what they say, and a tiny budget runs end to end."""

import runpy
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import train_synthetic  # noqa: E402


def test_mqar_answers_are_the_values_paired_with_the_queried_keys():
    ids, labels = train_synthetic.mqar(16, pairs=6, queries=3, generator=torch.Generator().manual_seed(1))
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        pairs = dict(zip(row[0:12:2], row[1:12:2], strict=True))
        assert len(pairs) == 6, "keys are distinct"
        for j in range(3):
            key, answer = row[12 + 2 * j], row[13 + 2 * j]
            assert pairs[key] == answer and lab[13 + 2 * j] == answer
        assert sum(v != -100 for v in lab) == 3, "only the answers are scored"


def test_copying_asks_for_the_data_tokens_in_order():
    ids, labels = train_synthetic.copying(8, length=20, data=5, generator=torch.Generator().manual_seed(2))
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        data = [t for t in row[:20] if t != 0]
        assert row[20] == 1 and row[21:] == data and lab[21:] == data
        assert all(v == -100 for v in lab[:21])


def test_demo_runs_with_a_tiny_budget(tmp_path, monkeypatch, capsys):
    plot = tmp_path / "curves.png"
    monkeypatch.setattr(sys, "argv", ["train_synthetic.py", "--steps", "4", "--batch", "8", "--plot", str(plot)])
    runpy.run_path(str(EXAMPLES / "train_synthetic.py"), run_name="__main__")
    out = capsys.readouterr().out
    for name in ("mamba", "mamba2", "hybrid"):
        assert f"\n{name} " in out
    assert "chance accuracy" in out
