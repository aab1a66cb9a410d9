"""The main demo: its synthetic tasks are what they say, its baseline is computed right, and a tiny budget
runs end to end."""

import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import synthetic_tasks  # noqa: E402
import train_synthetic  # noqa: E402


def test_mqar_scores_every_key_once_with_its_paired_value():
    task = synthetic_tasks.MQAR(pairs=6, keys=10, values=7)
    ids, targets = task(16, generator=torch.Generator().manual_seed(1))
    assert ids.shape == targets.shape == (16, 18)
    for row, target in zip(ids.tolist(), targets.tolist(), strict=True):
        keys, values = row[0:12:2], row[1:12:2]
        assert len(set(keys)) == 6 and all(k < 10 for k in keys) and all(v in task.answers for v in values)
        paired = dict(zip(keys, values, strict=True))
        assert sorted(row[12:]) == sorted(keys), "every key is queried once"
        assert target[:12] == [-100] * 12
        assert target[12:] == [paired[k] for k in row[12:]]


def test_copying_scores_the_data_tokens_in_order_at_the_markers():
    task = synthetic_tasks.Copying(length=20, data=5, values=9)
    ids, targets = task(8, generator=torch.Generator().manual_seed(2))
    assert ids.shape == targets.shape == (8, 25)
    for row, target in zip(ids.tolist(), targets.tolist(), strict=True):
        data = [t for t in row[:20] if t != 0]
        assert len(data) == 5 and all(t in task.answers for t in data)
        assert row[20:] == [1] * 5 and target[20:] == data and target[:20] == [-100] * 20


def test_earlier_value_baseline_matches_a_direct_count():
    answers = range(4, 8)
    ids = torch.tensor([[0, 4, 1, 4, 2, 5, 0, 1], [3, 6, 2, 7, 1, 6, 2, 3]])
    targets = torch.full_like(ids, -100)
    targets[0, 6], targets[0, 7] = 4, 6  # 2 distinct values read (4, 5): 1/2; 6 never read: 0
    targets[1, 2], targets[1, 7] = 6, 7  # only 6 read: 1; 6, 7 read: 1/2
    expected = []
    for b, t in (targets != -100).nonzero().tolist():
        read = {v for v in ids[b, : t + 1].tolist() if v in answers}
        expected.append((targets[b, t].item() in read) / max(len(read), 1))
    assert synthetic_tasks.earlier_value_accuracy(ids, targets, answers) == pytest.approx(sum(expected) / 4)
    assert sum(expected) / 4 == pytest.approx((0.5 + 0 + 1 + 0.5) / 4)


def test_lr_schedule_warms_up_holds_and_decays_to_zero():
    factor = train_synthetic.lr_factor(100)
    assert factor(0) == pytest.approx(0.1) and factor(9) == 1.0  # warmup over the first tenth
    assert factor(10) == factor(80) == 1.0  # constant
    assert factor(90) == pytest.approx(0.5) and factor(99) == pytest.approx(0.05)  # decay over the last fifth
    assert factor(100) == 0.0


def test_demo_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    plot = tmp_path / "accuracy.svg"
    argv = ["--steps", "2", "--batch", "4", "--held-out", "8", "--eval-every", "1", "--plot", str(plot)]
    results = train_synthetic.main(argv)  # the default models, two worker processes
    out = capsys.readouterr().out
    for name in (*train_synthetic.DEFAULT_MODELS, "random earlier value", "chance"):
        assert f"\n{name} " in out
    assert [r["model"] for r in results] == train_synthetic.DEFAULT_MODELS
    assert [r["lr"] for r in results] == [train_synthetic.MODELS[m][2] for m in train_synthetic.DEFAULT_MODELS]
    assert [len(r["curve"]) for r in results] == [3] * len(results)
    assert [r["state"] for r in results][:3] == [2 * 8 * 16 * n for n in (4, 16, 64)]  # 2 layers, 8 heads of 16
    svg = plot.read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == len(results) and "random earlier value" in svg


def test_demo_lr_option_overrides_every_model(tmp_path):
    argv = ["--steps", "1", "--batch", "2", "--held-out", "4", "--lr", "1e-3", "--plot", str(tmp_path / "a.svg")]
    results = train_synthetic.main([*argv, "--models", "mamba", "hybrid", "--workers", "1"])  # in this process
    assert [r["lr"] for r in results] == [1e-3, 1e-3]
