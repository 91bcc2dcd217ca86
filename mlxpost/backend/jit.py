"""Vectorized kernels from MLX's CPU JIT (Linux).

``mx.compile`` on MLX's CPU backend fuses element-wise graphs into C++ that
it builds at run time with ``g++ -std=c++17 -O3 -fPIC -shared``, for the
baseline target of the architecture. There its ``exp`` (a Cephes-style
polynomial) calls out for ``fma`` and ``floor`` and the kernel loop stays
scalar: about 10 ns an element, which is what the softmax of attention, SiLU
and the output layer's log-sum-exp cost on a CPU. Built for the host CPU
(``-march=native``), with the polynomial inlined (``-finline-limit``) and
without the assumption that float compares may trap (``-fno-trapping-math``,
which is what blocks if-converting its NaN/overflow selects), the same loop
vectorizes: ``exp`` over 2.5M floats takes 0.7 ms instead of 27 ms here.
None of this changes a result: no fast-math, and ``-ffp-contract=off``
(g++ would otherwise fuse ``a * b + c`` into one FMA instruction once the
target has it), so the same operations run in the same order and round the
same way (a test checks bit for bit, inf and NaN included).

MLX calls ``g++`` by name, so :func:`jit_env` puts a ``g++`` shim (a shell
script that runs the real compiler with the flags appended) first on
``PATH``, and points ``TMPDIR`` (where MLX keeps its kernel cache,
``$TMPDIR/mlx/<version>/cpu``) at a directory of its own, private to the
user: kernels built earlier without the flags are not reused, and kernels
built for this CPU stay apart from other machines' that may share ``/tmp``.
The ``TMPDIR`` change is inherited by child processes, whose temporary files
then land in that directory too (it is still under the temporary
directory). :func:`mlxpost.backend.blas.maybe_reexec` applies it before MLX does
any work. Opt out with ``MLXPOST_JIT=0``. Linux on x86-64 only: that is
where the flags were checked (on aarch64 g++ already contracts to FMA by
default, so ``-ffp-contract=off`` would change results there).

Two processes that start on an empty kernel cache may both build a kernel
(MLX writes it in place); that race is MLX's own, as with ``/tmp/mlx``.

No MLX import here: this runs before MLX is loaded.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["ACTIVE_VAR", "FLAGS", "OPT_OUT_VAR", "SAVED_TMPDIR_VAR", "active", "apply", "jit_env", "opted_out",
           "without_shim"]

FLAGS = ("-march=native", "-fno-trapping-math", "-finline-limit=10000", "-ffp-contract=off")

OPT_OUT_VAR = "MLXPOST_JIT"

ACTIVE_VAR = "MLXPOST_JIT_FLAGS"  # set (to the flags) in a process whose MLX JIT uses the shim

SAVED_TMPDIR_VAR = "MLXPOST_JIT_TMPDIR"  # TMPDIR before the shim's directory replaced it ("" when unset)

_SHIM = """#!/bin/sh
# Written by mlxpost (mlxpost/jit.py): MLX's CPU JIT builds its fused kernels with
# "g++ ..."; these flags let g++ inline and vectorize them (results unchanged).
exec {gxx} "$@" {flags}
"""


def _cpu_signature() -> str:
    """The first CPU's model and feature flags (what -march=native depends on)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    keep = []
    for line in text.splitlines():
        if not line.strip():
            break  # first processor only
        key = line.partition(":")[0].strip()
        if key in ("model name", "flags"):
            keep.append(line)
    return "\n".join(keep)


def _builds(gxx: str, flags: tuple[str, ...] = ()) -> bool:
    """Whether ``gxx`` (a compiler, or the shim) builds a shared object the way MLX asks it to."""
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "probe.cpp", Path(d) / "probe.so"
        src.write_text('extern "C" float probe(float x) { return x * 2.0f; }\n')
        try:
            r = subprocess.run([gxx, "-std=c++17", "-O3", "-fPIC", "-shared", *flags, str(src), "-o", str(out)],
                               capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0 and out.is_file()


def _private_dir(path: Path) -> bool:
    """Create ``path`` for this user only, or check that an existing one is (it will hold an executable)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _write_shim(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".g++.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)  # atomic: a concurrent run sees the old or the new file, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_shim_dir(entry: str) -> bool:
    """Whether a ``PATH`` entry is the ``bin`` directory of one of our shims."""
    return Path(entry).parent.name.startswith("mlxpost-jit-")


def without_shim(path: str) -> str:
    """``path`` (a ``PATH`` value) without the directories of our shims: where the real compiler is."""
    return os.pathsep.join(p for p in path.split(os.pathsep) if not _is_shim_dir(p))


def opted_out(environ=None) -> bool:
    """Whether ``MLXPOST_JIT`` turns the flags off."""
    env = os.environ if environ is None else environ
    return env.get(OPT_OUT_VAR, "").strip().lower() in {"0", "false", "no", "off"}


def jit_env(environ=None) -> dict | None:
    """Environment changes that make MLX's CPU JIT build vectorized kernels, or None.

    None off Linux x86-64 (the flags are checked there; elsewhere the
    baseline differs, e.g. aarch64 builds contract to FMA by default), with
    ``MLXPOST_JIT=0``, when already applied (the marker ``MLXPOST_JIT_FLAGS``
    is set), without a ``g++`` on ``PATH`` (or when that is a shim of ours),
    when ``TMPDIR`` holds the ``PATH`` separator, when the compiler rejects the
    flags, when the shim cannot run (a ``noexec`` temporary directory), or
    when its directory cannot be made private to this user. Otherwise
    ``{"PATH", "TMPDIR", "MLXPOST_JIT_FLAGS", "MLXPOST_JIT_TMPDIR"}`` (the
    last: the ``TMPDIR`` replaced, so that :func:`apply` can undo the
    changes in a child process told ``MLXPOST_JIT=0``), with the shim written
    (once; keyed by the user, the flags, the compiler and the CPU) in
    ``$TMPDIR/mlxpost-jit-<uid>-<key>/bin``, a directory only this user can
    write (it holds an executable and the kernels MLX loads).
    """
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if opted_out(env) or env.get(ACTIVE_VAR):
        return None
    path = env.get("PATH", os.defpath)
    gxx = shutil.which("g++", path=path)
    if gxx is None or _is_shim_dir(os.path.dirname(gxx)):
        return None  # none, or a shim of ours (marker lost): never wrap a shim in a shim
    gxx = os.path.abspath(gxx)  # not resolved: ccache and friends dispatch on the name they are called by
    tmp = os.path.abspath(env.get("TMPDIR") or tempfile.gettempdir())
    if os.pathsep in tmp:
        return None  # cannot go on PATH
    parts = [*FLAGS, os.path.realpath(gxx), _cpu_signature()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    base = Path(tmp) / f"mlxpost-jit-{os.getuid()}-{key}"
    shim = base / "bin" / "g++"
    text = _SHIM.format(gxx=shlex.quote(gxx), flags=" ".join(shlex.quote(f) for f in FLAGS))
    if not (_private_dir(base) and _private_dir(shim.parent)):
        return None
    try:
        if not shim.is_file() or shim.read_text() != text:
            if not _builds(gxx, FLAGS):
                return None
            _write_shim(shim, text)
            if not _builds(str(shim)):  # e.g. a noexec /tmp: PATH would skip the shim silently
                shim.unlink(missing_ok=True)
                return None
    except OSError:
        return None
    return {"PATH": f"{shim.parent}{os.pathsep}{path}", "TMPDIR": str(base), ACTIVE_VAR: " ".join(FLAGS),
            SAVED_TMPDIR_VAR: env.get("TMPDIR", "")}


def apply() -> bool:
    """Apply :func:`jit_env` to this process (before MLX compiles anything). True when active.

    With ``MLXPOST_JIT=0`` in a process that inherited the changes (a child
    of an mlxpost process), undo them: the shim leaves ``PATH`` and
    ``TMPDIR`` gets its old value back.
    """
    if opted_out() and os.environ.get(ACTIVE_VAR):
        os.environ["PATH"] = without_shim(os.environ.get("PATH", ""))
        saved = os.environ.pop(SAVED_TMPDIR_VAR, None)
        if saved:
            os.environ["TMPDIR"] = saved
        elif saved is not None:
            os.environ.pop("TMPDIR", None)
        os.environ.pop(ACTIVE_VAR, None)
    changes = jit_env()
    if changes:
        os.environ.update(changes)
    return active()


def active() -> bool:
    """Whether this process's MLX JIT builds kernels with :data:`FLAGS` (and ``MLXPOST_JIT`` is not 0)."""
    return bool(os.environ.get(ACTIVE_VAR)) and not opted_out()
