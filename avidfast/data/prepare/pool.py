"""A crash-tolerant pool of worker processes, and a progress bar over its results."""
import sys
import time
from collections import deque
from typing import Callable, Dict, Iterator, List, Tuple


def progress_bar(items: Iterator, total: int, desc: str, enabled: bool) -> Iterator:
    """Yields ``items`` (``total`` of them), with a tqdm bar on stderr when ``enabled``."""
    if not enabled or total == 0:
        yield from items
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="file", file=sys.stderr) as bar:
        for item in items:
            bar.update(1)
            yield item


class WorkerPool:
    """Runs picklable tasks in spawned processes, each with a deadline.

    Unlike concurrent.futures, a task that hangs or kills its process costs only that task: the
    process is killed (or found dead) and replaced, and the task is reported as failed.
    ``workers=0`` runs tasks in this process (no protection; for debugging and small jobs).
    """

    def __init__(self, workers: int):
        self.workers = workers
        self._procs: List[tuple] = []  # (process, connection)

    def _spawn(self):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(target=_worker_main, args=(child,), daemon=True)
        process.start()
        child.close()
        return process, parent

    def run(self, fn: Callable[[dict], dict], tasks: List[tuple]) -> Iterator[Tuple[str, str, object]]:
        """Yields (key, "ok", result) or (key, "failed", message) per (key, payload, timeout) task."""
        if not tasks:
            return
        if self.workers == 0:
            for key, payload, _ in tasks:
                try:
                    yield key, "ok", fn(payload)
                except Exception as error:
                    yield key, "failed", f"{type(error).__name__}: {error}"
            return
        from multiprocessing.connection import wait

        while len(self._procs) < min(self.workers, len(tasks)):
            self._procs.append(self._spawn())
        pending = deque(tasks)
        idle = list(self._procs)
        busy: Dict[object, tuple] = {}  # connection -> (process, key, deadline, timeout)
        while pending or busy:
            while pending and idle:
                process, conn = idle.pop()
                key, payload, timeout = pending.popleft()
                try:
                    conn.send((fn, payload))
                except (OSError, EOFError):  # died while idle: replace it and retry the task
                    idle.append(self._replace(process, conn))
                    pending.appendleft((key, payload, timeout))
                    continue
                busy[conn] = (process, key, time.monotonic() + timeout, timeout)
            soonest = min(deadline for _, _, deadline, _ in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, soonest - time.monotonic())):
                process, key, _, _ = busy.pop(conn)
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    process.join(5)
                    code = process.exitcode
                    yield key, "failed", f"worker process died (exit code {code})"
                    idle.append(self._replace(process, conn))
                    continue
                yield key, status, value
                idle.append((process, conn))
            now = time.monotonic()
            for conn, (process, key, deadline, timeout) in list(busy.items()):
                if deadline <= now:
                    del busy[conn]
                    yield key, "failed", f"timed out after {timeout:.0f} s"
                    idle.append(self._replace(process, conn))

    def _replace(self, process, conn):
        if process.is_alive():
            process.kill()
        process.join(5)
        conn.close()
        self._procs = [(p, c) for p, c in self._procs if p is not process]
        fresh = self._spawn()
        self._procs.append(fresh)
        return fresh

    def close(self) -> None:
        for process, conn in self._procs:
            try:
                conn.send(None)
            except (OSError, EOFError):
                pass
        for process, conn in self._procs:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
            conn.close()
        self._procs = []


def _worker_main(conn) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            return
        fn, payload = message
        try:
            reply = ("ok", fn(payload))
        except BaseException as error:  # noqa: B902 - reported, the worker lives on
            reply = ("failed", f"{type(error).__name__}: {error}")
        try:
            conn.send(reply)
        except (OSError, EOFError):
            return

