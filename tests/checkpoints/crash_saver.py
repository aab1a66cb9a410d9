"""Driver of the crash and race tests, run in a subprocess: ``python -m tests.checkpoints.crash_saver MODE FOLDER``.

It imports torch once with one thread (so forking is safe) and forks the saves it kills or races:

- ``kill``: for k = 1, 2, ... restore FOLDER (a sharded checkpoint of the old model plus the user's files),
  fork a child that saves the new model over it and SIGKILLs itself just before its k-th file-system call
  (write, move, fsync, remove), then report what FOLDER loads as; then save a third model normally and report
  whether the killed save's leftovers are gone. Ends at the first k the save survives.
- ``race``: several rounds of two children saving different models into FOLDER at the same instant.

Prints one JSON object per line.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import sys
import traceback

import torch

torch.set_num_threads(1)

import ssmblocks  # noqa: E402
import ssmblocks.checkpoints.saving as saving  # noqa: E402
from tests.checkpoints.builders import rerandomise  # noqa: E402

RECIPE = """
name: tiny
vocab_size: 97
d_model: 32
n_layers: 2
tie_embeddings: false
mixers:
  m: {kind: ssd, d_state: 8, head_dim: 8, n_groups: 2, chunk_size: 8}
pattern: m m
"""
SHARDS = 4000
USER_FILES = {"notes.txt": b"my notes", "model_ema.safetensors": b"the user's EMA weights"}


def model(seed: int):
    return rerandomise(ssmblocks.build(ssmblocks.Recipe.from_yaml(RECIPE)).eval(), seed)


def holds(folder: pathlib.Path, candidates: dict[str, torch.nn.Module]) -> str:
    """The name of the candidate the folder loads as, 'mix' when tensors of several, or the error."""
    try:
        loaded = ssmblocks.from_pretrained(folder).state_dict()
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"
    for name, candidate in candidates.items():
        if all(torch.equal(loaded[k], v) for k, v in candidate.state_dict().items()):
            return name
    return "mix"


def user_files_intact(folder: pathlib.Path) -> bool:
    return all((folder / name).read_bytes() == data for name, data in USER_FILES.items())


def leftovers(folder: pathlib.Path) -> list[str]:
    """Files and folders in FOLDER that neither the committed checkpoint nor the user has."""
    from ssmblocks.checkpoints.io import committed_files

    return sorted({p.name for p in folder.iterdir()} - committed_files(folder) - set(USER_FILES))


def kill_before_call(k: int) -> None:
    """From now on, SIGKILL this process just before its k-th file-system call."""
    calls = [0]

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapper

    for module, name in [(os, "replace"), (os, "unlink"), (os, "fsync"), (os, "mkdir"), (os, "rmdir")]:
        setattr(module, name, counted(getattr(module, name)))
    saving.save_file = counted(saving.save_file)
    pathlib.Path.write_text = counted(pathlib.Path.write_text)
    shutil.copyfile = counted(shutil.copyfile)


def fork(run) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            run()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def kill_mode(folder: pathlib.Path) -> None:
    old, new, third = model(1), model(2), model(3)
    pristine = folder.with_name(folder.name + "-pristine")
    ssmblocks.save_pretrained(old, pristine, max_shard_size=SHARDS)
    for name, data in USER_FILES.items():
        (pristine / name).write_bytes(data)
    for k in range(1, 1000):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pristine, folder)

        def save(k=k):
            kill_before_call(k)
            ssmblocks.save_pretrained(new, folder, max_shard_size=SHARDS)

        _, status = os.waitpid(fork(save), 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        after_kill = holds(folder, {"old": old, "new": new})
        intact = user_files_intact(folder)
        ssmblocks.save_pretrained(third, folder, max_shard_size=SHARDS)
        report = {"k": k, "killed": killed, "holds": after_kill, "user_files_intact": intact}
        report |= {"next_save_holds": holds(folder, {"third": third}), "leftovers": leftovers(folder)}
        print(json.dumps(report), flush=True)
        if not killed:
            return


def race_mode(folder: pathlib.Path, rounds: int = 6) -> None:
    models = {"a": model(2), "b": model(3)}
    ssmblocks.save_pretrained(model(1), folder, max_shard_size=SHARDS)
    for name, data in USER_FILES.items():
        (folder / name).write_bytes(data)
    for round_ in range(rounds):
        start_read, start_write = os.pipe()

        def save(which, start_read=start_read):
            os.read(start_read, 1)  # both children start at once
            ssmblocks.save_pretrained(models[which], folder, max_shard_size=SHARDS * (1 + (which == "b")))

        pids = [fork(lambda w=w: save(w)) for w in models]
        os.write(start_write, b"xx")
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
        os.close(start_read)
        os.close(start_write)
        report = {"round": round_, "exit_codes": [os.waitstatus_to_exitcode(s) for s in statuses]}
        report |= {"holds": holds(folder, models), "user_files_intact": user_files_intact(folder)}
        print(json.dumps(report | {"leftovers": leftovers(folder)}), flush=True)


if __name__ == "__main__":
    mode, target = sys.argv[1], pathlib.Path(sys.argv[2])
    {"kill": kill_mode, "race": race_mode}[mode](target)
