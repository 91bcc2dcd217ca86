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

MLX calls ``g++`` by name, so :func:`jit_env` puts a two-line ``g++`` shim
that appends the flags first on ``PATH``, and points ``TMPDIR`` (where MLX
keeps its kernel cache, ``$TMPDIR/mlx/<version>/cpu``) at a directory of its
own: kernels built earlier without the flags are not reused, and kernels
built for this CPU stay apart from other machines' that may share ``/tmp``.
:func:`mlxpost.system.maybe_reexec` applies it before MLX does any work.
Opt out with ``MLXPOST_JIT=0``.

No MLX import here: this runs before MLX is loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["ACTIVE_VAR", "FLAGS", "OPT_OUT_VAR", "active", "apply", "jit_env", "opted_out"]

FLAGS = ("-march=native", "-fno-trapping-math", "-finline-limit=10000", "-ffp-contract=off")
OPT_OUT_VAR = "MLXPOST_JIT"
ACTIVE_VAR = "MLXPOST_JIT_FLAGS"  # set (to the flags) in a process whose MLX JIT uses the shim

_SHIM = """#!/bin/sh
# Written by mlxpost (mlxpost/jit.py): MLX's CPU JIT builds its fused kernels with
# "g++ ..."; these flags let g++ inline and vectorize them (results unchanged).
exec "{gxx}" "$@" {flags}
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
        if key in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
            keep.append(line)
    return "\n".join(keep)


def _flags_work(gxx: str, flags: tuple[str, ...]) -> bool:
    """Whether ``gxx`` builds a shared object with ``flags`` (compilers differ)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text('extern "C" float probe(float x) { return x * 2.0f; }\n')
        try:
            r = subprocess.run([gxx, "-std=c++17", "-O3", "-fPIC", "-shared", *flags, str(src),
                                "-o", str(Path(d) / "probe.so")],
                               capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def _write_shim(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)  # atomic: a concurrent run sees the old or the new file, never half of one


def opted_out(environ=None) -> bool:
    """Whether ``MLXPOST_JIT`` turns the flags off."""
    env = os.environ if environ is None else environ
    return env.get(OPT_OUT_VAR, "").strip().lower() in {"0", "false", "no", "off"}


def jit_env(environ=None) -> dict | None:
    """Environment changes that make MLX's CPU JIT build vectorized kernels, or None.

    None off Linux, with ``MLXPOST_JIT=0``, when already applied (the marker
    ``MLXPOST_JIT_FLAGS`` is set), without a ``g++`` on ``PATH``, or when that
    compiler rejects the flags. Otherwise ``{"PATH", "TMPDIR",
    "MLXPOST_JIT_FLAGS"}``, with the shim written (once; it is keyed by the
    flags, the compiler and the CPU).
    """
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return None
    if opted_out(env):
        return None
    if env.get(ACTIVE_VAR):
        return None
    path = env.get("PATH", os.defpath)
    gxx = shutil.which("g++", path=path)
    if gxx is None:
        return None
    gxx = os.path.realpath(gxx)
    key = hashlib.sha256("\0".join([*FLAGS, gxx, _cpu_signature()]).encode()).hexdigest()[:12]
    tmp = env.get("TMPDIR") or tempfile.gettempdir()
    base = Path(tmp) / f"mlxpost-jit-{key}"
    shim = base / "bin" / "g++"
    text = _SHIM.format(gxx=gxx, flags=" ".join(FLAGS))
    try:
        current = shim.read_text() if shim.exists() else None
        if current != text:
            if not _flags_work(gxx, FLAGS):
                return None
            _write_shim(shim, text)
    except OSError:
        return None
    return {"PATH": f"{shim.parent}{os.pathsep}{path}", "TMPDIR": str(base), ACTIVE_VAR: " ".join(FLAGS)}


def apply() -> bool:
    """Apply :func:`jit_env` to this process (before MLX compiles anything). True when active."""
    changes = jit_env()
    if changes:
        os.environ.update(changes)
    return active()


def active() -> bool:
    """Whether this process's MLX JIT builds kernels with :data:`FLAGS`."""
    return bool(os.environ.get(ACTIVE_VAR))
