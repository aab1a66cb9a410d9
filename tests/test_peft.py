"""PEFT LoRA on every kind of linear layer: changes outputs, trains, merges to the same outputs."""

import pytest
import torch

from ssmblocks.training import linear_layers, lora_targets
from tests.helpers import assert_close
from tests.test_model import VOCAB, hybrid

peft = pytest.importorskip("peft")

KINDS = {"in_proj", "x_proj", "dt_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"}
KINDS |= {"gate_proj", "up_proj", "down_proj"}


def test_targets_cover_every_linear_kind_but_the_head():
    model = hybrid()
    assert set(lora_targets(model)) == KINDS
    kinds = linear_layers(model)
    assert kinds["lm_head"] == ["lm_head"]
    assert len(kinds["in_proj"]) == 4  # SelectiveSSM, SSD, the SSD inside the parallel block, the last SSD


def test_lora_changes_outputs_trains_and_merges():
    torch.manual_seed(0)
    model = hybrid()
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        base = model(ids).logits.clone()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets(model), init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    adapted = {name for name, module in lora.named_modules() if isinstance(module, peft.tuners.lora.Linear)}
    assert {name.rsplit(".", 1)[-1] for name in adapted} == KINDS, "every kind of linear layer is adapted"
    with torch.no_grad():
        assert (lora(ids).logits - base).abs().max() > 1e-3, "adapters must change the outputs"

    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = lora(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    with torch.no_grad():
        adapted_logits = lora(ids).logits.clone()
        merged = lora.merge_and_unload()
        assert not any(isinstance(m, peft.tuners.lora.Linear) for m in merged.modules())
        assert_close(merged(ids).logits, adapted_logits, 1e-5, "merged == adapted")
