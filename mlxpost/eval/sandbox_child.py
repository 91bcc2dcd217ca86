"""The child side of :mod:`mlxpost.eval.sandbox`: limit this process, isolate it, then run one program.

Run as ``python -I sandbox_child.py PROGRAM LIMITS_JSON`` in a fresh
temporary directory; standard library only (nothing of mlxpost is imported,
and importing this module does nothing). In order:

1. resource limits: address space (memory), CPU seconds, file size, no
   core files, open files;
2. on Linux, new network and PID namespaces (``unshare``; with a new user
   namespace when not root): no network at all, and the program runs as
   PID 1 of its namespace, so every process it starts dies with it (it is
   also killed when this process dies, ``PR_SET_PDEATHSIG``);
3. no new processes (``RLIMIT_NPROC`` 0, which binds users other than
   root) and a guard that disables, in Python, what generated code has no
   business calling: forking and running programs, signals, sockets,
   deleting or moving files, changing permissions;
4. ``exec`` of the program. Exit status: 0 it ran to the end, 1 it raised
   (the last line of the traceback on stderr), 3 it ran out of memory.

What was applied is written to ``isolation.json`` beside the program. This
is defence in depth for code a model wrote, not a boundary against code
written to escape (it runs with this user's file permissions).
"""

from __future__ import annotations

import json
import os
import sys

_CLONE_NEWNS_FLAGS = {"net": 0x40000000, "pid": 0x20000000, "user": 0x10000000}
_PR_SET_PDEATHSIG = 1
_EXIT = os._exit  # kept: the guard takes os._exit away from the program (exiting 0 early is not a pass)


def _limits(limits: dict) -> list[str]:
    import resource

    done = []
    want = [("RLIMIT_AS", limits["memory_mb"] << 20, "memory"), ("RLIMIT_CPU", limits["cpu_seconds"], "cpu"),
            ("RLIMIT_FSIZE", limits["file_mb"] << 20, "file size"), ("RLIMIT_CORE", 0, "core"),
            ("RLIMIT_NOFILE", 64, "open files")]
    for name, value, label in want:
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
            done.append(label)
        except (ValueError, OSError, AttributeError):
            pass  # macOS does not enforce every limit
    return done


def _unshare() -> list[str]:
    """New network and PID namespaces (Linux); the names of those made."""
    if not sys.platform.startswith("linux"):
        return []
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNS_FLAGS["net"] | _CLONE_NEWNS_FLAGS["pid"]
    if os.geteuid() != 0:
        flags |= _CLONE_NEWNS_FLAGS["user"]
    if libc.unshare(flags) != 0:
        return []
    return ["network namespace", "pid namespace"]


def _guard() -> None:
    """Make the calls generated code must not make raise instead."""
    import builtins
    import shutil
    import socket
    import subprocess

    def forbidden(name):
        def call(*args, **kwargs):
            raise PermissionError(f"the sandbox forbids {name}")

        return call

    for name in ("_exit", "abort", "fork", "forkpty", "system", "popen", "kill", "killpg", "setsid", "remove",
                 "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown",
                 "fchmod", "fchown", "lchown", "chroot", "putenv", "unsetenv", "execv", "execve", "execvp", "execvpe",
                 "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl",
                 "spawnle", "posix_spawn", "posix_spawnp", "setuid", "setgid", "nice"):
        if hasattr(os, name):
            setattr(os, name, forbidden(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, forbidden(f"shutil.{name}"))
    subprocess.Popen = forbidden("subprocess.Popen")  # type: ignore[misc]

    class NoSocket(socket.socket):  # a class still (modules subclass it on import), that never opens
        def __init__(self, *args, **kwargs):
            raise PermissionError("the sandbox forbids sockets")

    socket.socket = NoSocket  # type: ignore[misc]
    builtins.exit = builtins.quit = forbidden("exit")  # a program must not end itself as a pass
    sys.modules["ctypes"] = None  # type: ignore[assignment]  # no way around the guard through C calls


def _run(program: str) -> int:
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no new processes (root is exempt; the guard is not)
    except (ValueError, OSError, AttributeError):
        pass
    with open(program, encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    _guard()
    try:
        exec(code, {"__name__": "__main__"})
    except MemoryError:
        os.write(2, b"MemoryError: the program ran out of memory\n")
        return 3
    except BaseException as e:  # noqa: BLE001 - the program's own failure, reported on its last line
        os.write(2, f"{type(e).__name__}: {str(e)[:300]}\n".encode("utf-8", "replace"))
        return 1
    return 0


def main() -> None:
    program, limits_file = sys.argv[1], sys.argv[2]
    with open(limits_file) as f:
        limits = json.load(f)
    applied = _limits(limits)
    spaces = _unshare()
    with open("isolation.json", "w") as f:
        json.dump({"limits": applied, "namespaces": spaces}, f)
    sys.stdout.flush()
    if "pid namespace" not in spaces:
        _EXIT(_run(program))
    pid = os.fork()  # the first process of the new PID namespace: everything it starts dies with it
    if pid == 0:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, 9)  # killed when this runner is killed
        except Exception:  # noqa: BLE001
            pass
        _EXIT(_run(program))
    _, status = os.waitpid(pid, 0)
    _EXIT(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
