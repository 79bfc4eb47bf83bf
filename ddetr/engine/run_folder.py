"""The run folder (cfg.output_dir): owned by one run at a time, its history never lost.

- ``lock_run_folder``: a run holds ``output_dir/.lock`` (``fcntl.flock``) while it trains;
  a second run into the folder is refused. The run removes the file when it stops, on
  an error or Ctrl-C too; the operating system releases the lock of a process that is
  killed, and the next run takes over the file it left.
- ``refuse_previous_run``: a new run (not a resume) never starts in a folder that holds
  a previous run's checkpoint or log.
- ``log.jsonl``: one line per epoch, only ever appended. A resume appends a line
  ``{"resumed_at_epoch": E, "checkpoint": ..., "changed": {key: [old, new]}}``; lines of
  epochs after E written before it (a run that went on past the checkpoint it was later
  resumed from) stay in the file, and ``read_log`` sets them aside.
"""
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:            # Windows: no flock; the folder is then not locked
    fcntl = None

LOCK_NAME = ".lock"
CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.jsonl"


class RunFolderError(ValueError):
    """An output_dir that this run may not use; the message names it and says why."""


@contextmanager
def lock_run_folder(out_dir):
    """Create out_dir and hold its lock for the duration of the with block. The lock
    file is removed when the block ends, however it ends (removed while still locked,
    so that a run waiting on the old file takes a new one: see ``_take_lock``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    f = _take_lock(path, out_dir)
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield out_dir
    finally:
        if fcntl is not None:
            path.unlink(missing_ok=True)      # still locked: see _take_lock
        f.close()                             # closing the file releases the lock
        if fcntl is None:
            path.unlink(missing_ok=True)      # Windows removes no open file


def _take_lock(path, out_dir):
    """The open, locked lock file at path; RunFolderError naming the holder if another
    run holds it. A file its holder removed between our open and our lock is not the
    lock any more: open the path again."""
    while True:
        f = open(path, "a+")
        if fcntl is None:
            return f
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunFolderError(f"output_dir {out_dir} is in use by another run "
                                 f"({holder}); wait for it to end or choose another "
                                 f"output_dir") from None
        if _same_file(f, path):
            return f
        f.close()


def _same_file(f, path):
    try:
        here, there = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def refuse_previous_run(out_dir):
    """A new run must not overwrite a previous run's checkpoint or log in out_dir."""
    out_dir = Path(out_dir)
    found = [name for name in (CHECKPOINT_NAME, LOG_NAME)
             if (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0]
    if found:
        raise RunFolderError(f"output_dir {out_dir} holds a previous run ({', '.join(found)}); "
                             f"resume it (--resume, or train(cfg, resume=True)) or choose "
                             f"another output_dir")


def remove_stale_temporaries(out_dir):
    """Delete the temporary files of checkpoint saves that were killed (ours alone)."""
    for stale in Path(out_dir).glob(f".{CHECKPOINT_NAME}.*.tmp"):
        stale.unlink(missing_ok=True)


def start_log(out_dir, history, resumed_at=None, checkpoint=None, changed=None):
    """Begin this run's part of out_dir/log.jsonl (appending only).

    A new run: nothing (its first epoch's record creates the log, so that a run stopped
    before it leaves no empty log). A resume from epoch E = len(history): a resume
    line, then the checkpoint's records that the log lacks (a run killed between saving
    its checkpoint and writing its log line)."""
    path = Path(out_dir) / LOG_NAME
    if resumed_at is None:
        return
    logged = {r["epoch"] for r in read_log(path)} if path.is_file() else set()
    lines = [{"resumed_at_epoch": resumed_at, "checkpoint": str(checkpoint),
              "changed": {k: list(v) for k, v in (changed or {}).items()}}]
    lines += [r for r in history if r["epoch"] not in logged]
    for line in lines:
        append_log(out_dir, line)


def append_log(out_dir, record):
    with open(Path(out_dir) / LOG_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path):
    """The epoch records of a log.jsonl (a list of dicts), as the run stands: a resume
    line sets aside the records of later epochs written before it."""
    records = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "resumed_at_epoch" in record:
                records = [r for r in records if r["epoch"] <= record["resumed_at_epoch"]]
            else:
                records.append(record)
    return records
