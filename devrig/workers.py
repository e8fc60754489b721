"""Stream workers for rig runs: in a thread of this process, or as real ``deeper`` processes.

Threads share one loaded backbone (loading TensorFlow per worker costs seconds) and still talk
to the broker through real kafka-python clients; processes are what production runs, with
their own interpreter, and can be SIGKILLed and started again. Each process incarnation logs
JSON to its own file, read incrementally (:class:`LogTail`): that is how the rig knows when a
worker was up, got its partitions, did a batch, or wrote a part file.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
#: ``python -m pipeline.app.cli`` plus a Python stack dump of every thread into the log on SIGUSR1,
#: so a worker that stalls inside a call can be asked where (:meth:`WorkerProcess.dump_stacks`).
_BOOT = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
         "from pipeline.app.cli import main; sys.exit(main())")


class WorkerThread:
    """Runs a StreamWorker's loop in a thread; ``stop()`` shuts it down like SIGTERM would."""

    def __init__(self, worker):
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc

    def stop(self, timeout: float = 60) -> None:
        self.worker.stop_event.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("worker did not stop")
        if self.error:
            raise self.error


def _log_time(entry: Mapping[str, Any]) -> float | None:
    try:
        return dt.datetime.fromisoformat(entry["time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


class LogTail:
    """Incremental reader of a JSON-lines log; every event gets ``_t`` (epoch seconds)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self.all: list[dict[str, Any]] = []

    def events(self) -> list[dict[str, Any]]:
        """Read what was appended since the last call; return every event so far."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except OSError:
            return self.all
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.startswith(b"{"):
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                item["_t"] = _log_time(item)
                self.all.append(item)
        return self.all

    def named(self, event: str, after: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event and (e["_t"] or 0.0) >= after]


@dataclass
class Incarnation:
    """One run of a worker process, from its start to its kill or stop."""

    role: str
    index: int
    process: subprocess.Popen
    log: LogTail
    started_at: float
    ended_at: float | None = None
    killed: bool = False
    returncode: int | None = None
    _log_file: Any = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.log.path

    def first(self, event: str, after: float = 0.0) -> float | None:
        """Time of the first ``event`` in this incarnation's log at or after ``after``."""
        found = self.log.named(event, after)
        return found[0]["_t"] if found else None

    def count(self, event: str) -> int:
        return len(self.log.named(event))

    def batches(self, since: float = 0.0) -> list[dict[str, Any]]:
        return self.log.named("batch", since)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, event: str, timeout: float, after: float = 0.0) -> float | None:
        """Poll the log until ``event`` appears (its time), the process exits or ``timeout`` (None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.first(event, after)
            if t is not None:
                return t
            if not self.alive():
                return None
            time.sleep(0.1)
        return None

    def wait_count(self, event: str, n: int, timeout: float) -> bool:
        """Poll tightly until the log holds ``n`` ``event`` lines (to act right after one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            if self.count(event) >= n:
                return True
            time.sleep(0.005)
        return False

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class WorkerProcess:
    """``python -m pipeline.app.cli ROLE ARGS`` as a real subprocess, restartable after a kill.

    ``env`` is the whole environment (see :func:`devrig.topics.worker_env`); each
    incarnation logs to ``log_dir/<name>-<index>.log``. ``launcher`` goes before the command
    line (a test host's ``ip netns exec HOST``: :mod:`devrig.hosts`). ``module``: run
    ``python -m MODULE ROLE ARGS`` instead (a test hook wrapping the command line, e.g. to kill
    itself at a chosen point).
    """

    def __init__(self, role: str, env: Mapping[str, str], log_dir: Path, args: Sequence[str] = (),
                 name: str | None = None, launcher: Sequence[str] = (), module: str | None = None):
        self.role = role
        self.env = dict(env)
        self.log_dir = Path(log_dir)
        self.args = list(args)
        self.name = name or role
        self.launcher = list(launcher)
        self.module = module
        self.incarnations: list[Incarnation] = []
        self.unexpected_exits: list[dict[str, Any]] = []

    @property
    def current(self) -> Incarnation:
        return self.incarnations[-1]

    @property
    def pid(self) -> int:
        return self.current.process.pid

    def start(self) -> Incarnation:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        index = len(self.incarnations)
        log_path = self.log_dir / f"{self.name}-{index:02d}.log"
        log_file = open(log_path, "wb")
        boot = ["-m", self.module] if self.module else ["-c", _BOOT]
        process = subprocess.Popen([*self.launcher, sys.executable, *boot, self.role, *self.args],
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=self.env, cwd=REPO)
        incarnation = Incarnation(self.role, index, process, LogTail(log_path), time.time(), _log_file=log_file)
        self.incarnations.append(incarnation)
        return incarnation

    def kill(self) -> float:
        """SIGKILL the current incarnation (no shutdown code runs); return the kill time."""
        inc = self.current
        at = time.time()
        inc.process.send_signal(signal.SIGKILL)
        inc.returncode = inc.process.wait(30)
        inc.ended_at, inc.killed = at, True
        inc._log_file.close()
        return at

    def freeze(self) -> float:
        """SIGSTOP the current incarnation (a long GC pause, a stalled VM); return when."""
        self.current.process.send_signal(signal.SIGSTOP)
        return time.time()

    def thaw(self) -> float:
        """SIGCONT: the frozen incarnation runs on from where it stopped; return when."""
        self.current.process.send_signal(signal.SIGCONT)
        return time.time()

    def wait_exit(self, timeout: float) -> bool:
        """Wait for the current incarnation to end by itself (a fault hook killing it); record how."""
        inc = self.current
        try:
            inc.returncode = inc.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        inc.ended_at, inc.killed = time.time(), inc.returncode == -signal.SIGKILL
        inc._log_file.close()
        return True

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM: the worker checkpoints and leaves its group; return the exit status."""
        inc = self.current
        if inc.alive():
            inc.process.send_signal(signal.SIGTERM)
            try:
                inc.returncode = inc.process.wait(timeout)
            except subprocess.TimeoutExpired:
                inc.process.kill()
                inc.returncode = inc.process.wait(30)
                self.unexpected_exits.append({"index": inc.index, "why": f"ignored SIGTERM for {timeout:.0f} s"})
        else:
            inc.returncode = inc.process.returncode
        inc.ended_at = inc.ended_at or time.time()
        inc._log_file.close()
        return int(inc.returncode)

    def dump_stacks(self) -> None:
        """Have the current incarnation write every thread's stack to its log (SIGUSR1)."""
        if self.current.alive():
            self.current.process.send_signal(signal.SIGUSR1)
            time.sleep(1.0)

    def check(self) -> None:
        """Raise (with the log's tail) if the current incarnation exited."""
        inc = self.current
        if not inc.alive():
            raise RuntimeError(f"the {self.role} exited ({inc.process.returncode}); log {inc.log_path}:\n{inc.tail(40)}")

    def wait_for(self, event: str, timeout: float = 180.0) -> float:
        """Wait for ``event`` in the current incarnation's log; raise if it exits or times out."""
        t = self.current.wait_for(event, timeout)
        if t is None:
            self.check()
            raise TimeoutError(f"the {self.role} did not log {event!r} within {timeout:.0f} s; "
                               f"log {self.current.log_path}")
        return t

    def ensure_running(self) -> bool:
        """Restart the worker if it died on its own (as a supervisor would); True if it had to."""
        inc = self.current
        if inc.alive():
            return False
        inc.returncode, inc.ended_at = inc.process.returncode, time.time()
        self.unexpected_exits.append({"index": inc.index, "returncode": inc.returncode, "log_tail": inc.tail()})
        self.start()
        return True

    def total(self, event: str) -> int:
        return sum(inc.count(event) for inc in self.incarnations)

    def close(self) -> None:
        """Kill whatever still runs (cleanup after a failed run)."""
        for inc in self.incarnations:
            if inc.alive():
                inc.process.kill()
                inc.process.wait(30)
            inc._log_file.close()
