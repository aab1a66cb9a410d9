"""Tiny checkpoints that the checkpoint tests build themselves in tmp_path (nothing is downloaded).

- random transformers models (Mamba, Mamba2, Bamba), re-randomised so that every path contributes to the
  logits (transformers' own init makes some nearly vanish, e.g. Bamba's scan next to its D skip);
- the same weights in mamba_ssm's original layout (``backbone.embedding``, padded vocab, pytorch_model.bin);
- a tiny tokenizer.json;
- logits of our models, over a whole sequence or token by token through the state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

VOCAB = 97  # deliberately not a multiple of 8 or 16
SEQLEN = 21  # crosses the small chunk sizes used below (4, 5, 6, 8) at odd offsets


@torch.no_grad()
def rerandomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a value at which its path matters: matrices ~ N(0, 1/fan_in), A = -exp(A_log)
    with exp(A_log) in [1, 8], softplus(dt bias) in [0.01, 0.5], D ~ N(0, 1), norms 1 + 0.1 N(0, 1),
    conv weights 0.3 N(0, 1), other vectors (biases) 0.1 N(0, 1)."""
    g = torch.Generator().manual_seed(seed)

    def normal(p):
        return torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)

    def uniform(p, low, high):
        return (low + (high - low) * torch.rand(p.shape, generator=g, dtype=torch.float64)).to(p.dtype)

    for name, p in model.named_parameters():  # tied weights are listed once
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(uniform(p, 1.0, 8.0).log())
        elif leaf == "dt_bias" or name.endswith("dt_proj.bias"):
            dt = uniform(p, 0.01, 0.5)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif leaf == "D":
            p.copy_(normal(p))
        elif p.dim() == 1 and "norm" in name:
            p.copy_(1 + 0.1 * normal(p))
        elif "conv1d.weight" in name:
            p.copy_(0.3 * normal(p))
        elif p.dim() >= 2:
            p.copy_(normal(p) / math.sqrt(p.shape[1]))
        else:
            p.copy_(0.1 * normal(p))
    return model


# --- transformers models ---------------------------------------------------------------------------------

TINY_BAMBA = dict(  # attention at layer 1 with GQA 4 -> 2; SSD with 2 groups of 4 heads
    hidden_size=32,
    num_hidden_layers=3,
    attn_layer_indices=[1],
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    mamba_n_heads=8,
    mamba_d_head=8,
    mamba_n_groups=2,
    mamba_d_state=8,
    mamba_chunk_size=8,
)
HF_CLASSES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "bamba": "BambaForCausalLM"}
HF_CONFIGS = {"mamba": "MambaConfig", "mamba2": "Mamba2Config", "bamba": "BambaConfig"}


def hf_model(family: str, seed: int = 0, **config):
    """A random, re-randomised transformers model of ``family`` (eval mode, float32)."""
    import transformers

    config.setdefault("vocab_size", VOCAB)
    cfg = getattr(transformers, HF_CONFIGS[family])(**config)
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[family])(cfg).eval()
    return rerandomise(model, seed)


def save_hf(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


# --- our models ------------------------------------------------------------------------------------------


def make_ids(batch: int = 2, seqlen: int = SEQLEN, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def step_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of decoding ``ids`` one token at a time through the model's state."""
    state = model.init_state(ids.shape[0], ids.shape[1])
    return torch.cat([model(ids[:, t : t + 1], state=state).logits for t in range(ids.shape[1])], dim=1)


# --- mamba_ssm's original layout ---------------------------------------------------------------------------


def to_mamba_ssm(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF Mamba / Mamba2 state dict in mamba_ssm's key layout (the mixer keys are the same)."""
    renamed = {}
    for key, tensor in hf_state.items():
        key = key.replace("backbone.embeddings.weight", "backbone.embedding.weight")
        renamed[key] = tensor.detach().clone()
    return renamed


def original_config(d_model: int, n_layer: int, ssm_cfg: dict, multiple: int, tie: bool = True) -> dict:
    return {
        "d_model": d_model,
        "d_intermediate": 0,
        "n_layer": n_layer,
        "vocab_size": VOCAB,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": multiple,
        "tie_embeddings": tie,
    }


def write_original(folder: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """config.json + pytorch_model.bin (torch.save), as the state-spaces/mamba-* repos hold them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")
    return folder


# --- tokenizer ----------------------------------------------------------------------------------------------


def tiny_tokenizer():
    """A BPE tokenizer trained on a few words (tokenizers package; no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "<eos>"], show_progress=False)
    tok.train_from_iterator(["state space models", "selective scan", "the mamba layer", "hello world"] * 5, trainer)
    return tok


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def drop_manifest(folder: Path) -> None:
    """Remove the ssmblocks manifest from a saved folder's index, as if another tool had written it."""
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    del index["metadata"]["ssmblocks"]
    path.write_text(json.dumps(index))
