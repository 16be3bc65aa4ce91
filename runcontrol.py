"""
One owner per output, and clean stops: what keeps two runs, a Ctrl-C or a scheduler's SIGTERM from leaving a
run's outputs half written or mixed.

  OutputLock, lock_output   OUT.lock beside an output: a second run on it is refused in one line; a lock whose
                            process is gone (kill -9) is stale and taken over
  StopSignals               SIGINT / SIGTERM, or the launcher gone, stop a loop at the end of a step, agreed
                            over the ranks, so that the step's checkpoint can be written and the run resumed
"""
import contextlib
import json
import os
import signal
import socket
import sys
import time

from common import Stopped, all_reduce_sum, print0


def process_start(pid):
    """When process `pid` started (clock ticks since boot, /proc), or None where that is not known: a lock's
    pid reused by another process is then told apart from its owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid, started):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    return started is None or process_start(pid) in (None, started)


class OutputLock:
    """One owner per output: OUT.lock beside OUT (a folder or a file) holds the owner's pid, host and start.
    A second run on the same OUT is refused in one line naming the owner; a lock whose process is gone (same
    host: a kill -9, a crash) is stale and taken over, said in one line; a lock from another host is refused,
    since its process cannot be checked from here. Created with O_EXCL, so two runs started together cannot
    both win. Use as a context manager, or acquire() / release()."""

    def __init__(self, out):
        self.path, self.held = f"{os.path.abspath(out).rstrip('/')}.lock", False

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        mine = dict(pid=os.getpid(), host=socket.gethostname(), started=process_start(os.getpid()),
                    since=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv))
        for _ in range(3):  # a stale lock removed, then one more try (another run may take it meanwhile)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.clear_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            self.held = True
            return self
        raise ValueError(f"{self.path}: could not take the lock")

    def clear_stale(self):
        """Remove the lock if its owner is gone; else refuse, naming the owner."""
        try:
            with open(self.path) as f:
                owner = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError):  # half written by an owner killed at once, or damaged: look again
            time.sleep(0.2)
            with open(self.path) as f:
                text = f.read()
            try:
                owner = json.loads(text)
            except ValueError:
                print0(f"{self.path}: unreadable lock; taken over")
                os.remove(self.path)
                return
        who = f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"
        if owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
            os.remove(self.path)  # this process's own, from an earlier call that ended without releasing it
            return
        if owner.get("host") != socket.gethostname():
            raise ValueError(f"{self.path}: this output is in use by {who} (another host, not checkable from "
                             f"here); wait for that run, use another output, or remove the lock if it is over")
        if process_alive(int(owner.get("pid", -1)), owner.get("started")):
            raise ValueError(f"{self.path}: this output is in use by {who} ({owner.get('command')}); wait for it "
                             f"or use another output")
        print0(f"{self.path}: stale lock of {who} (that process is gone); taken over")
        stale = f"{self.path}.stale-{os.getpid()}"
        try:
            os.replace(self.path, stale)  # atomic: of two runs clearing it, one moves it, the other finds none
            os.remove(stale)
        except FileNotFoundError:
            pass

    def release(self):
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_output(out, rank, world_size):
    """OutputLock(out) taken by rank 0 (None on the other ranks), or a refusal on every rank: rank 0 raises the
    one-line reason, the others exit quietly (so that no rank waits for one that has left)."""
    lock, refused = None, None
    if rank == 0:
        try:
            lock = OutputLock(out).acquire()
        except ValueError as e:
            refused = e
    if all_reduce_sum([float(refused is not None)], world_size)[0]:
        if refused:
            raise refused
        sys.exit(1)
    return lock


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's first word before a kill) ask a loop to stop at the end of the
    step in progress, not in the middle of it; a second signal stops at once. The launcher gone (torchrun
    killed: this process's parent changed) asks the same, so no worker goes on writing after a crash.
    `check(world_size)` after each step returns what asks to stop, the same on every rank (an all-reduce:
    ranks that saw the signal a step apart still stop together), or None. Use as a context manager."""

    def __init__(self):
        self.received, self.previous = None, {}
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ else None

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self.previous[number] = signal.signal(number, self.handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number, frame):
        if self.received:  # the second signal: at once
            raise Stopped(f"stopped at once by a second {signal.Signals(number).name}; the last checkpoint is "
                          f"intact: rerun with --resume", 128 + number)
        self.received = number

    def check(self, world_size):
        """None, or (signal number or 0 for the launcher gone), agreed over the ranks."""
        launcher_gone = self.parent is not None and os.getppid() != self.parent
        flags = all_reduce_sum([float(self.received == signal.SIGINT), float(self.received == signal.SIGTERM),
                                float(launcher_gone)], world_size)
        if flags[2]:
            return 0
        return signal.SIGTERM if flags[1] else signal.SIGINT if flags[0] else None
