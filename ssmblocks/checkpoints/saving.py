"""Saving a checkpoint folder so that at every instant it loads as exactly its old or exactly its new checkpoint,
killed or racing saves included.

A save, one at a time per folder (an exclusive ``flock`` on the folder, on POSIX systems):

1. removes what killed saves left: hidden ``.ssmblocks-save-*`` folders, and files named like a save's own
   (``model-<id>-0000k-of-0000n.safetensors``, ``tokenizer-<id>.json``) that the committed index does not list;
2. writes the new files into a fresh ``.ssmblocks-save-<id>`` folder inside the folder, the weights and the
   tokenizer under names that carry the save's random id, and moves those in (no existing file is touched);
3. commits with one ``os.replace`` of ``model.safetensors.index.json``: the index names the weight files, and
   its ``metadata.ssmblocks`` manifest records each file's sha256, the tokenizer file and the config.json or
   recipe.yaml text itself, so a loader that reads it sees the whole new checkpoint;
4. then replaces the copies kept for other tools (config.json or recipe.yaml, tokenizer.json);
5. removes the files that the previous checkpoint listed and the new one does not. Nothing else is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import CheckpointError
from .io import SAFETENSORS_INDEX, SAVED_NAME, committed_files, sha256_of

try:
    import fcntl
except ImportError:  # Windows: saves are still atomic, but not serialised against each other
    fcntl = None

TMP_PREFIX = ".ssmblocks-save-"


def save_folder(
    folder: str | Path,
    tensors: dict[str, torch.Tensor],
    descriptor: tuple[str, str],
    tokenizer=None,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = False,
) -> None:
    """Save ``tensors`` with ``descriptor`` (file name, text: config.json or recipe.yaml) and an optional
    ``tokenizer`` (anything with ``save(path)``) into ``folder``, by the protocol of this module. A failure
    leaves the folder as it was; a folder this save created is removed again."""
    folder = _target(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(folder):
            _remove_leftovers(folder)
            _save_locked(folder, tensors, descriptor, tokenizer, max_shard_bytes, progress)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


def _target(folder: str | Path) -> Path:
    if not str(folder).strip():
        raise CheckpointError("save: the folder is an empty path; name the folder to save into")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder")
    return folder


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder: concurrent saves into it run one after the other."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(folder: Path) -> None:
    """Remove the temporary folders and the uncommitted files of saves that were killed (we hold the lock,
    so no save is running)."""
    listed = committed_files(folder)
    for path in folder.iterdir():
        if path.name.startswith(TMP_PREFIX) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif SAVED_NAME.fullmatch(path.name) and path.name not in listed:
            path.unlink(missing_ok=True)


def _save_locked(folder, tensors, descriptor, tokenizer, max_shard_bytes, progress) -> None:
    previous = committed_files(folder)
    save_id = secrets.token_hex(4)
    tmp = folder / f"{TMP_PREFIX}{save_id}"
    tmp.mkdir()
    moved: list[Path] = []
    try:
        own, copies = _write_files(tmp, tensors, descriptor, tokenizer, save_id, max_shard_bytes, progress)
        for name in own:
            os.replace(tmp / name, folder / name)
            moved.append(folder / name)
        _fsync(folder)
        os.replace(tmp / SAFETENSORS_INDEX, folder / SAFETENSORS_INDEX)  # the commit point
        moved.clear()
        _fsync(folder)
        for name in copies:
            os.replace(tmp / name, folder / name)
        for name in previous - {SAFETENSORS_INDEX, *own, *copies}:
            (folder / name).unlink(missing_ok=True)
    finally:
        for path in moved:  # moved in, never committed
            path.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _write_files(tmp: Path, tensors, descriptor, tokenizer, save_id, max_shard_bytes, progress):
    """Write the whole checkpoint into ``tmp``; returns the names of the save's own files (weights, tokenizer)
    and of the copies for other tools. The index is written last."""
    weight_map = write_shards(tmp, tensors, save_id, max_shard_bytes, progress)
    own = sorted(set(weight_map.values()))
    name, text = descriptor
    (tmp / name).write_text(text)
    copies = [name]
    tokenizer_file = None
    if tokenizer is not None:
        tokenizer_file = f"tokenizer-{save_id}.json"
        tokenizer.save(str(tmp / tokenizer_file))
        shutil.copyfile(tmp / tokenizer_file, tmp / "tokenizer.json")
        own.append(tokenizer_file)
        copies.append("tokenizer.json")
    for file in [*own, *copies]:
        _fsync(tmp / file)
    manifest = {
        "descriptor": {"name": name, "text": text},
        "sha256": {file: sha256_of(tmp / file) for file in own},
        "tokenizer": tokenizer_file,
        "copies": copies,
    }
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, "ssmblocks": manifest}, "weight_map": weight_map}
    (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    _fsync(tmp / SAFETENSORS_INDEX)
    return own, copies


def write_shards(
    folder: Path, tensors: dict[str, torch.Tensor], save_id: str, max_shard_bytes: int, progress: bool = False
) -> dict[str, str]:
    """Shards ``model-<save_id>-0000k-of-0000n.safetensors`` of at most max_shard_bytes each (a larger tensor
    gets a shard of its own); returns the weight map, tensor name -> file name."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.contiguous()
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(tqdm(shards, desc="writing shards", unit="shard", disable=not progress), start=1):
        name = f"model-{save_id}-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    return weight_map


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk, so a power cut cannot reorder the commit. (Windows
    cannot open a folder to flush it; there the rename is flushed with the file system's journal.)"""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
