"""examples/finetune.py: LoRA on a checkpoint folder, adapters and a merged model written and loadable."""

import json
import sys
from pathlib import Path

import pytest
import torch

import ssmblocks
from tests.test_model import hybrid

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune  # noqa: E402


def test_finetune_refuses_bytes_for_a_small_vocabulary_without_tokenizer(tmp_path):
    ssmblocks.save_pretrained(hybrid(), tmp_path / "base", format="ssmblocks")  # vocab 97, no tokenizer.json
    text = tmp_path / "text.txt"
    text.write_text("some text " * 40)
    with pytest.raises(SystemExit, match="vocabulary too small for bytes"):
        finetune.main([str(tmp_path / "base"), "--text", str(text), "--out", str(tmp_path / "out"), "--steps", "2"])


def test_finetune_writes_adapters_and_a_merged_model_that_loads(tmp_path):
    recipe = ssmblocks.Recipe.model_validate(
        {**hybrid().recipe.model_dump(), "vocab_size": 256, "pad_vocab_size_multiple": 1}
    )
    torch.manual_seed(0)
    base = ssmblocks.build(recipe).eval()
    ssmblocks.save_pretrained(base, tmp_path / "base", format="ssmblocks")
    finetune.main(
        [str(tmp_path / "base"), "--out", str(tmp_path / "out"), "--steps", "5", "--seq-len", "32", "--lr", "1e-2"]
    )
    adapter_config = json.loads((tmp_path / "out" / "adapters" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) >= {"in_proj", "x_proj", "q_proj", "gate_proj", "down_proj"}
    merged = ssmblocks.from_pretrained(tmp_path / "out" / "merged")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert merged(ids).logits.shape == base(ids).logits.shape
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-4, "the merged model carries the training"


def test_pack_lays_whole_paragraphs_end_to_end_within_the_budget():
    paragraphs = [torch.arange(n) + 100 * n for n in (5, 9, 3, 12, 7)]
    torch.manual_seed(0)
    ids, cu_seqlens = finetune.pack(paragraphs, budget=20)
    bounds = cu_seqlens.tolist()
    assert cu_seqlens.dtype == torch.int32 and bounds[0] == 0 and bounds[-1] == ids.shape[1] <= 20
    pieces = [ids[0, a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    assert all(any(torch.equal(piece, p) for p in paragraphs) for piece in pieces)  # whole paragraphs only
    assert len({piece[0].item() for piece in pieces}) == len(pieces)  # each at most once


def test_finetune_packed_trains_on_cu_seqlens(tmp_path, monkeypatch):
    recipe = ssmblocks.Recipe.model_validate(
        {**hybrid().recipe.model_dump(), "vocab_size": 256, "pad_vocab_size_multiple": 1}
    )
    ssmblocks.save_pretrained(ssmblocks.build(recipe), tmp_path / "base", format="ssmblocks")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"paragraph {i} " + "words " * (i % 5 + 1) for i in range(30)))
    packs, real_pack = [], finetune.pack

    def spy(*args):
        packs.append(real_pack(*args))
        return packs[-1]

    monkeypatch.setattr(finetune, "pack", spy)
    finetune.main([str(tmp_path / "base"), "--text", str(text), "--out", str(tmp_path / "out"), "--steps", "3",
                   "--seq-len", "32", "--batch", "2", "--pack"])  # fmt: skip
    assert len(packs) == 3 and all(cu.numel() > 2 for _, cu in packs)  # several paragraphs a step
    assert (tmp_path / "out" / "adapters" / "adapter_config.json").exists()
