"""from_pretrained / save_pretrained: find the family, build the recipe, map the keys, load strictly."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError
from torch import nn

from ..errors import CheckpointError, NonFiniteWarning
from ..model import CausalLM, build
from ..precision import warn_if_slow_bf16
from ..recipe import Recipe
from . import bamba_hf, mamba2_hf, mamba_hf, mamba_ssm
from .family import Family
from .io import (
    DESCRIPTORS,
    MAX_TOKENIZER_BYTES,
    SAFETENSORS_INDEX,
    Manifest,
    check_regular,
    read_bounded,
    read_manifest,
    read_tensors,
    verify,
    weight_files,
)
from .keymap import KeyMap
from .saving import save_folder

FAMILIES: list[Family] = [mamba_hf.FAMILY, mamba2_hf.FAMILY, bamba_hf.FAMILY, mamba_ssm.FAMILY]
HF_FAMILIES = {"mamba": mamba_hf.FAMILY, "mamba2": mamba2_hf.FAMILY, "bamba": bamba_hf.FAMILY}
NATIVE_KEYS = KeyMap([("{rest}", "{rest}")])
RECIPE_FILE = "recipe.yaml"
HUB_FILES = ["*.json", "*.yaml", "tokenizer*", "*.safetensors"]
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_folder(path_or_repo_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (config, weights and tokenizer files only)."""
    if not str(path_or_repo_id).strip():
        raise CheckpointError("from_pretrained: the path is empty; name a checkpoint folder or a hub id")
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


def read_descriptor(folder: Path, manifest: Manifest | None) -> tuple[str, str]:
    """(file name, text) of what says which model the folder holds: the committed manifest's copy, else
    recipe.yaml, else config.json."""
    if manifest is not None:
        name, text = manifest.descriptor
        copy = folder / name
        if copy.exists() and read_bounded(copy) != text.encode("utf-8"):
            warnings.warn(
                f"{copy} differs from the {name} committed with the weights in {SAFETENSORS_INDEX}; loading the "
                "committed one (save the model again to change it)",
                stacklevel=3,
            )
        return manifest.descriptor
    for name in DESCRIPTORS:
        if (folder / name).exists():
            check_regular(folder / name)
            data = read_bounded(folder / name)
            try:
                return name, data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{folder / name}: not UTF-8 text ({e})") from None
    raise CheckpointError(f"{folder}: no config.json (nor {RECIPE_FILE}) to tell what model this is")


def detect(where: Path, descriptor: tuple[str, str], tensors: dict[str, torch.Tensor]) -> tuple[Recipe, KeyMap, str]:
    """The recipe, key map and family name of a checkpoint, from its descriptor (file name, text) and tensors.
    ``where`` names the folder in messages."""
    name, text = descriptor
    if name == RECIPE_FILE:
        try:
            return Recipe.from_yaml_text(text), NATIVE_KEYS, "ssmblocks"
        except (ValueError, yaml.YAMLError) as e:
            raise CheckpointError(f"{where / RECIPE_FILE}: not a valid recipe:\n{e}") from None
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where / name}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{where / name}: expected a JSON object, got {type(config).__name__}")
    shapes = {key: tuple(t.shape) for key, t in tensors.items()}
    for family in FAMILIES:
        if family.matches(config, shapes):
            try:
                return family.to_recipe(config, shapes), family.keys, family.name
            except ValidationError as e:
                raise CheckpointError(f"{where / name}: {family.name} config gives no valid recipe:\n{e}") from None
    known = ", ".join(sorted(HF_FAMILIES))
    raise CheckpointError(
        f"{where / name}: unknown model_type {config.get('model_type')!r} (supported: {known}, the "
        "original mamba_ssm format, and ssmblocks' own)"
    )


def from_pretrained(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
    non_finite: str = "warn",
) -> CausalLM:
    """Load a checkpoint folder or hub repo into a CausalLM, strictly (every weight present, none extra,
    every shape right, floating-point tensors only). dtype defaults to float32; A_log, D and SSD's dt_bias
    stay float32 whatever dtype says. A tokenizer.json beside the weights is loaded into ``model.tokenizer``
    (None otherwise). progress shows a progress bar over the weight files. Weights with NaN or infinity
    warn (``non_finite="warn"``) or raise a CheckpointError (``non_finite="error"``). A folder that ssmblocks
    saved loads exactly what its index committed, each file checked against its recorded sha256."""
    if non_finite not in ("warn", "error"):
        raise ValueError(f"from_pretrained: non_finite must be 'warn' or 'error', got {non_finite!r}")
    warn_if_slow_bf16(dtype, device)
    folder = resolve_folder(path_or_repo_id, revision)
    manifest = read_manifest(folder)
    files = [folder / name for name in manifest.weight_files] if manifest is not None else weight_files(folder)
    tensors = read_tensors(files, progress, manifest.sha256 if manifest is not None else None)
    recipe, keys, family = detect(folder, read_descriptor(folder, manifest), tensors)
    model = build(recipe, device="meta", dtype=dtype or torch.float32)
    load_strict(model, tensors, keys, family, device or "cpu", non_finite)
    model.tokenizer = _tokenizer(folder, manifest)
    return model.eval()


def load_strict(
    model: CausalLM, tensors: dict[str, torch.Tensor], keys: KeyMap, family: str, device, non_finite: str = "warn"
) -> None:
    """Map checkpoint keys to ours and assign them; any missing, unexpected, mis-shaped or non-float key is an
    error that lists them, and nothing is loaded then. Non-finite values warn or raise (``non_finite``)."""
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
    theirs = {k: keys.to_theirs(k) or k for k in expected}
    problems = {
        "missing keys": [theirs[k] for k in needed if k not in ours],
        "unexpected keys": unexpected,
        "wrong shapes": [
            f"{theirs[k]}: checkpoint {tuple(ours[k].shape)}, model {tuple(expected[k].shape)}"
            for k in needed
            if k in ours and ours[k].shape != expected[k].shape
        ],
        "not float16/bfloat16/float32/float64": [
            f"{theirs[k]}: {t.dtype}" for k, t in ours.items() if t.dtype not in WEIGHT_DTYPES
        ],
    }
    if any(problems.values()):
        parts = [f"{family} checkpoint does not fit the model its config describes; nothing was loaded."]
        for label, items in problems.items():
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(parts))
    check_finite({theirs[k]: t for k, t in ours.items()}, family, non_finite)
    for name, tensor in ours.items():
        target = expected[name]
        _assign(model, name, tensor.to(device=device, dtype=target.dtype))
    if tied:
        model.lm_head.weight = model.embedding.weight


def check_finite(tensors: dict[str, torch.Tensor], where: str, non_finite: str) -> None:
    """Warn about (or, non_finite="error", refuse) tensors that hold NaN or infinity, naming them."""
    bad = [key for key, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if not bad:
        return
    message = f"{where}: {len(bad)} tensor(s) hold NaN or infinity: " + ", ".join(bad[:20])
    if non_finite == "error":
        raise CheckpointError(message + "; nothing was loaded")
    warnings.warn(message + " (non_finite='error' refuses such weights)", NonFiniteWarning, stacklevel=3)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, nn.Parameter(value, requires_grad=getattr(module, attr).requires_grad))


def _tokenizer(folder: Path, manifest: Manifest | None):
    """The tokenizer the manifest committed, else a tokenizer.json in the folder, else None; a corrupt one is
    an error naming the file."""
    committed = manifest.tokenizer if manifest is not None else None
    path = folder / (committed or "tokenizer.json")
    if not path.exists():
        if committed:
            raise CheckpointError(f"{path}: the tokenizer {SAFETENSORS_INDEX} lists is missing")
        return None
    check_regular(path)
    if manifest is not None:
        verify(path, manifest.sha256)
    from tokenizers import Tokenizer

    text = read_bounded(path, MAX_TOKENIZER_BYTES).decode("utf-8", errors="replace")
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for every parse error
        raise CheckpointError(f"{path}: not a valid tokenizer file ({str(e)[:200]})") from None


def save_pretrained(
    model: CausalLM, folder: str | Path, format: str = "hf", max_shard_size: int = 5 * 2**30, progress: bool = False
) -> None:
    """Write ``model`` to ``folder``: format "hf" (config.json + safetensors that transformers loads, for the
    Mamba, Mamba2 and Bamba families) or "ssmblocks" (recipe.yaml + safetensors, for any recipe), the weights
    in shards of at most max_shard_size bytes with an index. Crash- and race-safe: at every instant the folder
    loads as its old or its new checkpoint (``ssmblocks.checkpoints.saving``); files the previous checkpoint
    did not list are never touched. Weights with NaN or infinity are saved with a NonFiniteWarning."""
    recipe = model.recipe
    if format == "ssmblocks":
        descriptor, keys = (RECIPE_FILE, recipe.to_yaml()), NATIVE_KEYS
    elif format == "hf":
        family = _hf_family(recipe)
        descriptor, keys = ("config.json", json.dumps(family.to_config(recipe), indent=2)), family.keys
    else:
        raise CheckpointError(f"save_pretrained: format must be 'hf' or 'ssmblocks', got {format!r}")
    tensors = {}
    for name, tensor in model.state_dict().items():
        if recipe.tie_embeddings and name == "lm_head.weight":
            continue
        tensors[keys.to_theirs(name)] = tensor.detach().cpu()
    check_finite(tensors, f"save_pretrained({str(folder)!r})", "warn")
    save_folder(folder, tensors, descriptor, getattr(model, "tokenizer", None), max_shard_size, progress)


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
