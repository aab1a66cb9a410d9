"""Reading checkpoint files, trusting nothing: only regular files inside the folder, JSON and YAML read with
bounded size, shard indexes that name plain files of the folder, safetensors (single or sharded) preferred,
``.bin`` through ``torch.load(weights_only=True)`` only, and sha256 checks where our own index records them.

A folder that ssmblocks saved has ``model.safetensors.index.json`` with a ``metadata.ssmblocks`` manifest
(see ``saving``): it names every file of the checkpoint, their sha256 and the config or recipe itself, and
then it alone says what the checkpoint is.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..errors import CheckpointError, read_regular

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
DESCRIPTORS = ("recipe.yaml", "config.json")  # what says which model a folder holds, in the order they win
COPIES = (*DESCRIPTORS, "tokenizer.json")  # written beside a committed checkpoint for other tools
MAX_TEXT_BYTES = 64 * 2**20  # config.json, recipe.yaml, shard indexes
MAX_TOKENIZER_BYTES = 512 * 2**20
SAVED_NAME = re.compile(r"(model-[0-9a-f]{8}-\d{5}-of-\d{5}\.safetensors|tokenizer-[0-9a-f]{8}\.json)")
_HASH_CHUNK = 2**22


@dataclass(frozen=True)
class Manifest:
    """What an ssmblocks save committed: the descriptor (file name and text), the weight files, the sha256 of
    each file it wrote, the tokenizer file (or None) and the copies kept for other tools."""

    descriptor: tuple[str, str]
    weight_files: list[str]
    sha256: dict[str, str]
    tokenizer: str | None
    copies: list[str]

    def files(self) -> set[str]:
        return {SAFETENSORS_INDEX, *self.weight_files, *self.sha256, *self.copies}


def check_plain_name(name, where: str) -> str:
    """``name`` must be the name of a file directly in the folder: no folders, no '..', not absolute."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{where}: {name!r} is not a plain file name in the checkpoint folder; refused")
    return name


def check_regular(path: Path) -> None:
    """A path must be a regular file (symlinks followed): never open a FIFO, device or socket."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device, socket or folder); refused")


def read_bounded(path: Path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; never waits on a FIFO."""
    return read_regular(path, limit, CheckpointError)


def read_json(path: Path, what: str = "a JSON object"):
    """A JSON object from a bounded regular file; errors name the file."""
    check_regular(path)
    try:
        value = json.loads(read_bounded(path))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected {what}, got {type(value).__name__}")
    return value


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_map(index: dict, path: Path) -> dict[str, str]:
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise CheckpointError(f"{path}: not a valid shard index (weight_map must map tensor names to file names)")
    for name in set(weight_map.values()):
        check_plain_name(name, f"{path.name} weight_map")
    return weight_map


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of the checkpoint an ssmblocks save committed to ``folder``, or None."""
    path = folder / SAFETENSORS_INDEX
    if not path.exists():
        return None
    index = read_json(path, "a shard index (a JSON object)")
    metadata = index.get("metadata")
    own = metadata.get("ssmblocks") if isinstance(metadata, dict) else None
    if own is None:
        return None
    try:
        name, text = own["descriptor"]["name"], own["descriptor"]["text"]
        sha256, tokenizer, copies = dict(own["sha256"]), own["tokenizer"], list(own["copies"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the ssmblocks manifest in metadata is malformed ({e!r})") from None
    where = f"{path.name} metadata.ssmblocks"
    for file in [name, *sha256, *copies, *([tokenizer] if tokenizer is not None else [])]:
        check_plain_name(file, where)
    if name not in DESCRIPTORS or not isinstance(text, str):
        raise CheckpointError(f"{where}: descriptor must be one of {DESCRIPTORS} with its text, got {name!r}")
    strays = [f for f in copies if f not in COPIES] + [f for f in sha256 if not SAVED_NAME.fullmatch(f)]
    if strays:  # a save removes what the manifest lists: never let it name other files
        raise CheckpointError(f"{where}: lists files a save does not write: {strays}")
    weights = sorted(set(_weight_map(index, path).values()))
    return Manifest((name, text), weights, sha256, tokenizer, copies)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: a safetensors index, model.safetensors, a .bin index,
    pytorch_model.bin, in that order; else any *.safetensors or *.bin (not files of an uncommitted save)."""
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        path = folder / index
        if path.exists():
            names = sorted(set(_weight_map(read_json(path, "a shard index (a JSON object)"), path).values()))
            missing = [name for name in names if not (folder / name).exists()]
            if missing:
                raise CheckpointError(f"{path} lists shards that are missing: {missing}")
            return [folder / name for name in names]
        if index == SAFETENSORS_INDEX and (folder / SINGLE_FILES[0]).exists():
            return [folder / SINGLE_FILES[0]]
    if (folder / SINGLE_FILES[1]).exists():
        return [folder / SINGLE_FILES[1]]
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(p for p in folder.glob(pattern) if not SAVED_NAME.fullmatch(p.name))
        if files:
            return files
    raise CheckpointError(f"{folder}: no weights found (*.safetensors or *.bin)")


def verify(path: Path, sha256: dict[str, str]) -> None:
    """When our manifest records the file's sha256, the file must have it."""
    expected = sha256.get(path.name)
    if expected is not None and sha256_of(path) != expected:
        raise CheckpointError(
            f"{path.name}: sha256 differs from the one recorded when it was saved; the file is corrupt or was "
            "changed (re-download or re-save it)"
        )


def read_tensors(files: list[Path], progress: bool = False, sha256: dict | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the given files on the CPU, each file checked against ``sha256`` where it lists it.
    A key present in two files is an error."""
    tensors: dict[str, torch.Tensor] = {}
    for path in tqdm(files, desc="reading weights", unit="file", disable=not progress):
        check_regular(path)
        verify(path, sha256 or {})
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
        except (SafetensorError, OSError, ValueError, TypeError) as e:
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


def committed_files(folder: Path) -> set[str]:
    """Names of the files that make up the checkpoint now in ``folder``, those a save may replace or remove:
    what our manifest lists; for a checkpoint saved by another tool, its indexes and the shards they list,
    the single weight files and the descriptors. Files of an index that cannot be read are left alone."""
    try:
        manifest = read_manifest(folder)
    except CheckpointError:
        manifest = None
    if manifest is not None:
        return manifest.files()
    names = {*SINGLE_FILES, *DESCRIPTORS, SAFETENSORS_INDEX, BIN_INDEX}
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        try:
            names |= set(_weight_map(read_json(folder / index), folder / index).values())
        except (CheckpointError, OSError):
            continue
    return {name for name in names if (folder / name).exists()}
