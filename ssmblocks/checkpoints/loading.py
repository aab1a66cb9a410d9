"""from_pretrained / save_pretrained: find the family, build the recipe, map the keys, load strictly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml
from torch import nn

from ..errors import CheckpointError
from ..model import CausalLM, build
from ..precision import warn_if_slow_bf16
from ..recipe import Recipe
from . import bamba_hf, mamba2_hf, mamba_hf, mamba_ssm
from .family import Family
from .io import read_tensors, weight_files, write_folder, write_safetensors
from .keymap import KeyMap

FAMILIES: list[Family] = [mamba_hf.FAMILY, mamba2_hf.FAMILY, bamba_hf.FAMILY, mamba_ssm.FAMILY]
HF_FAMILIES = {"mamba": mamba_hf.FAMILY, "mamba2": mamba2_hf.FAMILY, "bamba": bamba_hf.FAMILY}
NATIVE_KEYS = KeyMap([("{rest}", "{rest}")])
RECIPE_FILE = "recipe.yaml"
HUB_FILES = ["*.json", "*.yaml", "tokenizer*", "*.safetensors"]
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_folder(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (config, weights and tokenizer files only)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint's folder")
    if not _HUB_ID.fullmatch(str(path_or_repo_id)):
        raise CheckpointError(f"{path_or_repo_id!r} is neither a local folder nor a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    def download(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=patterns))
        except Exception as e:  # the hub client's errors: not found, offline, gated, ...
            raise CheckpointError(
                f"{path_or_repo_id!r} is not a local folder, and downloading it from the hub failed: {e}"
            ) from e

    folder = download(HUB_FILES)
    if not any(folder.glob("*.safetensors")):  # only then the pickled weights
        folder = download(["*.bin", "*.bin.index.json"])
    return folder


def detect(folder: Path, tensors: dict[str, torch.Tensor]) -> tuple[Recipe, KeyMap, str]:
    """The recipe, key map and family name of the checkpoint in ``folder``."""
    if (folder / RECIPE_FILE).is_file():
        try:
            return Recipe.from_yaml(folder / RECIPE_FILE), NATIVE_KEYS, "ssmblocks"
        except (ValueError, yaml.YAMLError) as e:
            raise CheckpointError(f"{folder / RECIPE_FILE}: not a valid recipe:\n{e}") from None
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (nor {RECIPE_FILE}) to tell what model this is")
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    for family in FAMILIES:
        if family.matches(config, shapes):
            return family.to_recipe(config, shapes), family.keys, family.name
    known = ", ".join(sorted(HF_FAMILIES))
    raise CheckpointError(
        f"{folder / 'config.json'}: unknown model_type {config.get('model_type')!r} (supported: {known}, the "
        "original mamba_ssm format, and ssmblocks' own)"
    )


def from_pretrained(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
) -> CausalLM:
    """Load a checkpoint folder or hub repo into a CausalLM, strictly (every weight present, none extra,
    every shape right). dtype defaults to float32; A_log, D and SSD's dt_bias stay float32 whatever dtype says.
    A tokenizer.json beside the weights is loaded into ``model.tokenizer`` (None otherwise). progress shows
    a progress bar over the weight files."""
    warn_if_slow_bf16(dtype, device)
    folder = resolve_folder(path_or_repo_id, revision)
    tensors = read_tensors(weight_files(folder), progress)
    recipe, keys, family = detect(folder, tensors)
    model = build(recipe, device="meta", dtype=dtype or torch.float32)
    load_strict(model, tensors, keys, family, device or "cpu")
    model.tokenizer = _tokenizer(folder)
    return model.eval()


def load_strict(model: CausalLM, tensors: dict[str, torch.Tensor], keys: KeyMap, family: str, device) -> None:
    """Map checkpoint keys to ours and assign them; any missing, unexpected or mis-shaped key is an error
    that lists them, and nothing is loaded then."""
    expected = model.state_dict()
    tied = model.recipe.tie_embeddings
    ours: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in tensors.items():
        name = keys.to_ours(key)
        if name is None or name not in expected:
            unexpected.append(key)
        else:
            ours[name] = tensor
    if tied and "lm_head.weight" in ours:
        head = ours.pop("lm_head.weight")
        if "embedding.weight" in ours and not torch.equal(head, ours["embedding.weight"]):
            raise CheckpointError(
                f"{family}: config ties the embeddings, but the checkpoint's lm_head.weight differs from its "
                "embedding (config/weights disagreement)"
            )
    needed = [k for k in expected if not (tied and k == "lm_head.weight")]
    missing = [keys.to_theirs(k) or k for k in needed if k not in ours]
    wrong = [
        f"{keys.to_theirs(k) or k}: checkpoint {tuple(ours[k].shape)}, model {tuple(expected[k].shape)}"
        for k in needed
        if k in ours and ours[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [f"{family} checkpoint does not fit the model its config describes; nothing was loaded."]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(parts))
    for name, tensor in ours.items():
        target = expected[name]
        _assign(model, name, tensor.to(device=device, dtype=target.dtype))
    if tied:
        model.lm_head.weight = model.embedding.weight


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=getattr(module, attr).requires_grad))


def _tokenizer(folder: Path):
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def save_pretrained(
    model: CausalLM, folder: str | Path, format: str = "hf", max_shard_size: int = 5 * 2**30, progress: bool = False
) -> None:
    """Write ``model`` to ``folder``: format "hf" (config.json + safetensors that transformers loads, for the
    Mamba, Mamba2 and Bamba families) or "ssmblocks" (recipe.yaml + safetensors, for any recipe). Large
    models are sharded with an index. The write is atomic: a failure leaves an existing folder as it was."""
    recipe = model.recipe
    if format == "ssmblocks":
        config, keys = None, NATIVE_KEYS
    elif format == "hf":
        family = _hf_family(recipe)
        config, keys = family.to_config(recipe), family.keys
    else:
        raise CheckpointError(f"save_pretrained: format must be 'hf' or 'ssmblocks', got {format!r}")
    tensors = {}
    for name, tensor in model.state_dict().items():
        if recipe.tie_embeddings and name == "lm_head.weight":
            continue
        tensors[keys.to_theirs(name)] = tensor.detach().cpu()

    def write(tmp: Path) -> None:
        if config is None:
            (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
        else:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors(tmp, tensors, max_shard_size, progress)
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))

    write_folder(folder, write)


def _hf_family(recipe: Recipe) -> Family:
    kinds = {recipe.mixers[name].kind for name in recipe.layers}
    if kinds == {"selective_ssm"}:
        return mamba_hf.FAMILY
    if kinds == {"ssd"} and recipe.mlp is None:
        return mamba2_hf.FAMILY
    if kinds <= {"ssd", "attention"} and recipe.mlp is not None:
        return bamba_hf.FAMILY
    raise CheckpointError(
        f"save_pretrained(format='hf'): no transformers model holds this mix of layers ({sorted(kinds)}"
        f"{', with MLP' if recipe.mlp else ''}); save with format='ssmblocks'"
    )
