"""Running code a model wrote: a separate process with limits, no network and a temporary directory.

:func:`run_program` runs one Python program in a fresh interpreter
(``python -I``) started in an empty temporary directory, with a minimal
environment (no proxies, ``HOME`` and ``TMPDIR`` inside that directory), in
its own process group. The child (:mod:`mlxpost.eval.sandbox_child`) limits
itself (memory, CPU time, file size, no new processes), cuts itself off the
network (a new network namespace on Linux; ``sandbox-exec`` with network
denied on macOS), and disables in Python the calls generated code has no
business making. The parent waits at most ``seconds`` of wall time, then
kills the whole process group; whatever happened (a hang, a crash, a fork,
memory eaten) becomes an :class:`Outcome`, never an exception, so one bad
sample cannot stop an evaluation. :func:`run_programs` runs many at once.

This is how HumanEval's own harness and lm-eval treat generated code:
defence in depth against accidents, not a security boundary against code
written to escape (it runs with the user's file permissions). Nothing runs
without the user's consent (``--allow-code-exec``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CHILD = Path(__file__).with_name("sandbox_child.py")

MACOS_PROFILE = "(version 1)(allow default)(deny network*)"


@dataclass
class Limits:
    seconds: float = 10.0  # wall clock, the process group is killed after it
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file the program may write

    def child(self) -> dict:
        return {"memory_mb": self.memory_mb, "cpu_seconds": int(self.seconds) + 1, "file_mb": self.file_mb}


@dataclass
class Outcome:
    """How one program ended: ``passed`` only when it ran to its end without raising."""

    passed: bool
    status: str  # passed | failed | timeout | memory | crashed
    detail: str = ""
    isolation: dict = field(default_factory=dict)  # the limits and namespaces the child applied


def _macos_wrapper() -> list[str]:
    exe = shutil.which("sandbox-exec") if sys.platform == "darwin" else None
    return [exe, "-p", MACOS_PROFILE] if exe else []


def _outcome(rc: int, timed_out: bool, stderr: str) -> Outcome:
    last = next((ln for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    if timed_out:
        return Outcome(False, "timeout", "killed at the time limit")
    if rc == 0:
        return Outcome(True, "passed")
    if rc == 3 or "MemoryError" in last:
        return Outcome(False, "memory", last or "out of memory")
    if rc == 1:
        return Outcome(False, "failed", last)
    sig = rc - 128 if rc > 128 else -rc if rc < 0 else None
    if sig in (signal.SIGKILL, getattr(signal, "SIGXCPU", -1)):
        return Outcome(False, "timeout" if sig != signal.SIGKILL else "crashed", f"killed by signal {sig}")
    return Outcome(False, "crashed", f"exit status {rc}" + (f": {last}" if last else ""))


def run_program(code: str, limits: Limits | None = None) -> Outcome:
    """Run ``code`` in the sandbox (see the module docstring) and say how it ended."""
    limits = limits or Limits()
    work = Path(tempfile.mkdtemp(prefix="mlxpost-sandbox-"))
    try:
        (work / "program.py").write_text(code, encoding="utf-8")
        (work / "limits.json").write_text(json.dumps(limits.child()))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "TMPDIR": str(work),
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = _macos_wrapper() + [sys.executable, "-I", str(CHILD), "program.py", "limits.json"]
        with open(work / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # whatever it left behind in its process group goes too
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                rc = proc.wait()
        with open(work / "stderr.txt", "rb") as f:
            f.seek(max(0, os.path.getsize(work / "stderr.txt") - 4096))
            stderr = f.read().decode("utf-8", "replace")
        out = _outcome(rc, timed_out, stderr)
        try:
            out.isolation = json.loads((work / "isolation.json").read_text())
        except (OSError, ValueError):
            pass
        if _macos_wrapper():
            out.isolation.setdefault("namespaces", []).append("sandbox-exec (network denied)")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_programs(programs: list[str], limits: Limits | None = None, workers: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """:func:`run_program` on each program, ``workers`` at a time (default: the CPU count, at most 8), in order."""
    workers = workers or min(8, os.cpu_count() or 1)
    out: list[Outcome | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait on the child processes
        futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        for fut in futures:
            out[futures[fut]] = fut.result()
            if progress is not None:
                progress(1)
    return out  # type: ignore[return-value]


def isolation_note(outcomes: list[Outcome]) -> str:
    """One line: what the sandbox applied (from the first outcome), for eval.json and the table."""
    if not outcomes:
        return ""
    iso = outcomes[0].isolation or {}
    parts = [f"limits: {', '.join(iso.get('limits', [])) or 'none'}"]
    spaces = iso.get("namespaces") or []
    parts.append("network: " + ("cut off (" + ", ".join(spaces) + ")" if spaces else "guarded in Python only"))
    return "; ".join(parts)
