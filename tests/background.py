"""Subprocess jobs of the slow tests (workers with 8 simulated devices, CLI runs), started as soon as
the session's tests are collected and run at niceness 19, two at a time, in collection order: they
use the cycles this process leaves idle (XLA compiles on one core, so the suite keeps ~35% of two
cores idle), and a test that needs one waits for its result. A job nobody selected never starts.

A test module declares a job at import, naming the fixture whose tests need it:

    WORKER = background.Job(lambda folder: [sys.executable, "worker.py", str(folder)], fixture="results")

and that fixture returns `WORKER.result()` (a CompletedProcess; a job not yet started starts then).
Each job is its own small process (tiny models, SmolLM2 or abstract ones), so two at a time add a
few GiB to what this process holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

PARALLEL = 2
JOBS: list[Job] = []
_lock = threading.Condition()
_stopped = threading.Event()  # the session is over: start nothing more


class Job:
    def __init__(
        self,
        command: Callable[[Path], list[str] | list[list[str]]],
        *,
        fixture: str,
        env: dict | None = None,
        timeout: float = 1800,
    ):
        """command(folder): the argv, given an empty folder of the job's own (kept to the session's
        end), or several argvs started together (the processes of one jax.distributed run);
        fixture: the fixture, in the declaring module, whose tests need the job."""
        self.module = sys._getframe(1).f_globals["__name__"]
        self.command, self.fixture, self.env, self.timeout = command, fixture, env, timeout
        self.folder: Path | None = None
        self.procs: list[tuple[subprocess.Popen, IO[bytes], IO[bytes]]] = []
        self.error: BaseException | None = None
        self.done: list[subprocess.CompletedProcess] | None = None
        JOBS.append(self)

    def wanted_by(self, item) -> bool:
        return item.module.__name__ == self.module and self.fixture in item.fixturenames

    def _start(self) -> None:
        """Under _lock, once."""
        self.folder = Path(tempfile.mkdtemp(prefix="xlaserve-job-"))
        try:
            argvs = self.command(self.folder)
            for argv in argvs if isinstance(argvs[0], list) else [argvs]:
                # anonymous files, read by result(): a chatty job never blocks on a full pipe
                out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115
                proc = subprocess.Popen(["nice", "-n", "19", *argv], stdout=out, stderr=err, env=self.env)
                self.procs.append((proc, out, err))
        except BaseException as e:  # reported by result(), in the test that needs the job
            self.error = e

    def result(self) -> subprocess.CompletedProcess | list[subprocess.CompletedProcess]:
        """The finished process (its argv without `nice`, returncode, stdout and stderr as text), or
        one per argv of a job of several."""
        with _lock:
            if self.folder is None:
                self._start()
        if self.error is not None:
            raise self.error
        if self.done is None:
            deadline = time.monotonic() + self.timeout
            try:
                for proc, _, _ in self.procs:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                self.kill()
                raise
            self.done = [
                subprocess.CompletedProcess(proc.args[3:], proc.returncode, _read(out), _read(err))
                for proc, out, err in self.procs
            ]
        return self.done if len(self.done) > 1 else self.done[0]

    def running(self) -> int:
        return sum(proc.poll() is None for proc, _, _ in self.procs)

    def kill(self) -> None:
        for proc, _, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _read(f) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")


def start(items) -> None:
    """Start, in the background, every job a collected test needs."""
    wanted = [job for job in JOBS if any(job.wanted_by(item) for item in items)]
    if wanted:
        threading.Thread(target=_feed, args=(wanted,), daemon=True, name="background jobs").start()


def _feed(jobs: list[Job]) -> None:
    for job in jobs:
        with _lock:
            while sum(j.running() for j in JOBS) >= PARALLEL:
                _lock.wait(timeout=1.0)  # polled: a job ends without telling anyone
            if job.folder is None and not _stopped.is_set():
                job._start()


def stop() -> None:
    """At the session's end: kill what still runs (a job whose tests failed early), remove folders."""
    with _lock:
        _stopped.set()
        for job in JOBS:
            job.kill()
            if job.folder is not None:
                shutil.rmtree(job.folder, ignore_errors=True)
