"""Reading and writing checkpoint tensors: safetensors (single or sharded), `.bin` through
``torch.load(weights_only=True)`` only, and folder writes that never leave a half-written checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DESCRIPTORS = ("config.json", "recipe.yaml")  # what says which model a checkpoint folder holds


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors preferred over .bin."""
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{folder / index}: not a valid shard index ({e})") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder / index} lists shards that are missing: {missing}")
            return files
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{folder}: no weights found (*.safetensors or *.bin)")


def read_tensors(files: list[Path], progress: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the given files on the CPU. A key present in two files is an error."""
    tensors: dict[str, torch.Tensor] = {}
    for path in tqdm(files, desc="reading weights", unit="file", disable=not progress):
        for key, value in _read_file(path).items():
            if key in tensors:
                raise CheckpointError(f"{path.name}: tensor {key!r} appears in more than one weight file")
            tensors[key] = value
    return tensors


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path.name}: not a readable safetensors file, truncated or corrupt ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path.name}: refused to load: the pickle holds more than plain tensors (only weights_only loading "
            f"is allowed; no code from a checkpoint is ever run): {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path.name}: expected a flat dict of tensors (a state dict)")
    return state


def write_safetensors(
    folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, progress: bool = False
) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors shards plus an index when larger than
    max_shard_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(tqdm(shards, desc="writing shards", unit="shard", disable=not progress), start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


def write_folder(folder: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a fresh temporary folder beside ``folder``, then move the result in.

    A failure while writing leaves ``folder`` exactly as it was. A new folder appears in one rename; into an
    existing one each file is moved with an atomic replace, the user's other files are kept, and the files of
    the previous checkpoint that the new one does not have (old shards, the other format's config) are removed.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        if not folder.exists():
            tmp.rename(folder)
            return
        if not folder.is_dir():
            raise CheckpointError(f"{folder} exists and is not a folder")
        new = {p.name for p in tmp.iterdir()}
        for path in tmp.iterdir():
            os.replace(path, folder / path.name)
        owned = [*folder.glob("model*.safetensors"), folder / SAFETENSORS_INDEX, *(folder / f for f in DESCRIPTORS)]
        for stale in owned:
            if stale.name not in new and stale.exists():
                stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
