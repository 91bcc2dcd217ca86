"""System checks: which BLAS MLX uses, switching to a fast one, and ``doctor``.

On Linux the ``mlx[cpu]`` wheel bundles the netlib *reference* BLAS
(``mlx_cpu.libs/libblas-*.so``), which runs an fp32 matmul at a few GFLOP/s.
MLX calls plain ``cblas_sgemm`` & co., so a system OpenBLAS loaded with
``LD_PRELOAD`` takes precedence over the bundled library (a preloaded library is
in the global symbol scope, which the dynamic linker searches before MLX's own
dependencies).  That is 30-40x faster.  ``LD_PRELOAD`` is only honoured at
process start, so the CLI calls :func:`maybe_reexec` first thing, which
re-executes the interpreter once with the right environment.

Opt out with ``MLXPOST_SYSTEM_BLAS=0``.

This module must stay cheap to import: no MLX import at module level, and the
re-exec decision never imports MLX.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from . import jit

__all__ = [
    "blas_advice",
    "classify_blas_path",
    "coretype_from_cpuinfo",
    "fast_blas_env",
    "find_openblas",
    "loaded_blas",
    "maybe_reexec",
    "openblas_coretype",
]

OPT_OUT_VAR = "MLXPOST_SYSTEM_BLAS"

REEXEC_MARKER = "MLXPOST_REEXEC"

_X86 = {"x86_64", "amd64", "i386", "i686"}

_ARM64 = {"aarch64", "arm64"}


# Libraries whose CBLAS symbols carry a suffix (``cblas_sgemm64_``,
# ``scipy_cblas_sgemm64_``) and therefore never serve MLX, even when mapped.
_SUFFIXED_BLAS = re.compile(r"(numpy|scipy|torch)\.libs/|openblas64_|scipy_openblas|ilp64", re.I)


_BLAS_FILE = re.compile(r"lib(openblas|mkl_|blis|flexiblas|blas|cblas|accelerate)", re.I)


# The brief's one-liner; the install command is adapted to the distribution.
_ADVICE = (
    "MLX is using the slow reference BLAS; `{install}` makes training ~40x faster; "
    "mlxpost will then use it automatically"
)


def _machine() -> str:
    return platform.machine().lower()


def _opted_out(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(OPT_OUT_VAR, "").strip().lower() in {"0", "false", "no", "off"}


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _split_preload(value: str) -> list[str]:
    # ld.so accepts both spaces and colons as separators.
    return [p for p in re.split(r"[:\s]+", value or "") if p]


def _preloaded_blas(environ=None) -> str | None:
    """A BLAS already named in LD_PRELOAD (any vendor), or None."""
    env = os.environ if environ is None else environ
    for entry in _split_preload(env.get("LD_PRELOAD", "")):
        name, _ = classify_blas_path(entry)
        if name in {"openblas", "mkl", "blis", "flexiblas"}:
            return entry
    return None


def classify_blas_path(path: str) -> tuple[str, bool | None]:
    """Map a shared-library path to ``(name, fast)``.

    ``name`` is one of openblas / mkl / blis / flexiblas / accelerate /
    reference / unknown; ``fast`` is None when it cannot be told.
    """
    p = path.lower()
    base = os.path.basename(p)
    if "openblas" in p:  # also Debian's .../openblas-pthread/libblas.so.3
        return "openblas", True
    if "mkl" in base:
        return "mkl", True
    if "blis" in base:
        return "blis", True
    if "flexiblas" in base:
        return "flexiblas", None  # a dispatcher; the backend decides
    if "accelerate" in p or "veclib" in p:
        return "accelerate", True
    if "mlx_cpu.libs" in p or re.match(r"lib(c?blas)([-.]|$)", base):
        # The wheel's bundled netlib build, or a distribution's plain netlib
        # libblas (Debian's /usr/lib/<arch>/blas/libblas.so.3, Fedora's libblas).
        return "reference", False
    return "unknown", None


def _maps() -> list[tuple[int, int, str]]:
    """(start, end, path) for every file-backed mapping of this process."""
    text = _read_text("/proc/self/maps") or ""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        lo, _, hi = parts[0].partition("-")
        try:
            out.append((int(lo, 16), int(hi, 16), parts[5].strip()))
        except ValueError:
            continue
    return out


def _global_symbol_lib(symbol: str, maps=None) -> str | None:
    """Path of the library that provides ``symbol`` in the global scope.

    The global scope (executable, its dependencies, LD_PRELOAD, RTLD_GLOBAL
    libraries) is searched before a library's own dependencies, so when it
    holds ``cblas_sgemm`` that is the one MLX calls.
    """
    try:
        addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
    except (AttributeError, OSError, ValueError):
        return None
    if not addr:
        return None
    for lo, hi, path in maps if maps is not None else _maps():
        if lo <= addr < hi:
            return path
    return None


def _openblas_details(path: str) -> dict:
    """Config / core / threads of an OpenBLAS that is already mapped."""
    try:
        lib = ctypes.CDLL(path)  # already loaded: just another reference
        out = {}
        for key, fn, restype in (
            ("config", "openblas_get_config", ctypes.c_char_p),
            ("core", "openblas_get_corename", ctypes.c_char_p),
            ("threads", "openblas_get_num_threads", ctypes.c_int),
        ):
            f = getattr(lib, fn, None)
            if f is None:
                continue
            f.restype = restype
            f.argtypes = []
            v = f()
            out[key] = v.decode(errors="replace").strip() if isinstance(v, bytes) else v
        return out
    except Exception:  # pragma: no cover - best effort only
        return {}


def loaded_blas(import_mlx: bool = True) -> dict:
    """Which BLAS this process's MLX actually calls.

    Returns ``{"name", "path", "fast"}`` (plus ``core`` / ``config`` /
    ``threads`` for OpenBLAS when it can tell).  ``name`` is one of openblas,
    mkl, blis, flexiblas, accelerate, reference, unknown, or ``none`` when no
    BLAS is mapped yet (with ``import_mlx=False`` before MLX was imported).
    With ``import_mlx`` (the default) ``mlx.core`` is imported first so the
    answer reflects the libraries MLX brings in.
    """
    if sys.platform == "darwin":
        return {
            "name": "accelerate",
            "path": "/System/Library/Frameworks/Accelerate.framework",
            "fast": True,
        }
    if not sys.platform.startswith("linux"):
        return {"name": "unknown", "path": None, "fast": None}
    if import_mlx:
        try:
            import mlx.core  # noqa: F401 - on request only: this module must not load MLX before the re-exec
        except Exception:
            pass
    maps = _maps()
    path = _global_symbol_lib("cblas_sgemm", maps)
    if path is None:
        # No global provider: MLX binds to a BLAS among its own dependencies.
        # Prefer the wheel's bundled one, then anything else that is not a
        # symbol-suffixed copy (numpy's scipy_openblas64_ and friends).
        seen = []
        for _, _, p in maps:
            if p in seen or _SUFFIXED_BLAS.search(p):
                continue
            if _BLAS_FILE.search(os.path.basename(p)) and classify_blas_path(p)[0] != "unknown":
                seen.append(p)
        seen.sort(key=lambda p: 0 if "mlx_cpu.libs" in p else 1)
        path = seen[0] if seen else None
    if path is None:
        return {"name": "none", "path": None, "fast": None}
    name, fast = classify_blas_path(path)
    info = {"name": name, "path": path, "fast": fast}
    if name == "openblas":
        info.update(_openblas_details(path))
    return info


def _elf_matches(path: str) -> bool:
    """True when ``path`` is a 64-bit ELF for this machine (cheap header read)."""
    machines = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}
    want = machines.get(_machine())
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return False
    if want is None:
        return True
    return head[4] == 2 and int.from_bytes(head[18:20], "little") == want


def _openblas_candidates() -> list[str]:
    m = _machine()
    triplet = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu"}.get(
        m, "aarch64-linux-gnu" if m in _ARM64 else None
    )
    paths = []
    if triplet:
        for d in (f"/usr/lib/{triplet}", f"/lib/{triplet}"):
            # Debian/Ubuntu: pthread variant first (threaded), the
            # alternatives-managed symlink, then OpenMP, then serial.
            paths += [
                f"{d}/openblas-pthread/libopenblas.so.0",
                f"{d}/libopenblas.so.0",
                f"{d}/openblas-openmp/libopenblas.so.0",
                f"{d}/openblas-serial/libopenblas.so.0",
            ]
    paths += [
        # Fedora / RHEL: p = pthreads, o = OpenMP, plain = serial.
        "/usr/lib64/libopenblasp.so.0",
        "/usr/lib64/libopenblaso.so.0",
        # openSUSE.
        "/usr/lib64/libopenblas_pthreads.so.0",
        "/usr/lib64/libopenblas_openmp.so.0",
        "/usr/lib64/libopenblas.so.0",
        # Arch, Alpine, Void, /usr/local builds.
        "/usr/lib/libopenblas.so.0",
        "/usr/lib/libopenblas.so",
        "/usr/local/lib/libopenblas.so.0",
        "/usr/local/lib/libopenblas.so",
    ]
    return paths


def _ldconfig_openblas() -> list[str]:
    exe = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None
    )
    if not exe:
        return []

    try:
        out = subprocess.run(
            [exe, "-p"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        m = re.match(r"\s*(libopenblas\S*\.so\S*)\s+\(([^)]*)\)\s+=>\s+(\S+)", line)
        if m and "64_" not in m.group(1):
            found.append(m.group(3))
    # Threaded builds first.
    found.sort(key=lambda p: 0 if re.search(r"openblasp|pthread", p) else 1)
    return found


def find_openblas() -> str | None:
    """A system OpenBLAS shared library for this machine, or None."""
    if not sys.platform.startswith("linux"):
        return None
    for path in _openblas_candidates() + _ldconfig_openblas():
        if os.path.exists(path) and _elf_matches(path):
            return path
    return None


_SKYLAKEX_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}

_HASWELL_FLAGS = {"avx2", "fma"}


def coretype_from_cpuinfo(text: str) -> str | None:
    """The ``OPENBLAS_CORETYPE`` to force for a ``/proc/cpuinfo`` text.

    OpenBLAS 0.3.21 (Debian 12) does not know newer CPUs and may fall back to
    slow generic kernels.  We name a core whose instructions this CPU surely
    has: ``SkylakeX`` when AVX-512 (F/CD/BW/DQ/VL, what Skylake-X kernels use)
    is present, else ``Haswell`` when AVX2+FMA is.  None for anything else,
    including non-x86 CPUs (whose cpuinfo has no ``flags`` line).
    """
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags = set(value.split())
            break
    if _SKYLAKEX_FLAGS <= flags:
        return "SkylakeX"
    if _HASWELL_FLAGS <= flags:
        return "Haswell"
    return None


def openblas_coretype() -> str | None:
    """``coretype_from_cpuinfo`` for this machine (x86 Linux only)."""
    if not sys.platform.startswith("linux") or _machine() not in _X86:
        return None
    text = _read_text("/proc/cpuinfo")
    return coretype_from_cpuinfo(text) if text else None


def _global_blas_is_fast() -> bool:
    """A fast BLAS is already in the global scope (cheap; no MLX import)."""
    path = _global_symbol_lib("cblas_sgemm")
    return bool(path) and classify_blas_path(path)[1] is True


def fast_blas_env(environ=None) -> dict | None:
    """Environment changes that make MLX use a system OpenBLAS, or None.

    None when not on Linux x86_64/aarch64, when opted out with
    ``MLXPOST_SYSTEM_BLAS=0``, when a BLAS is already preloaded or in use,
    or when no OpenBLAS is installed.  Otherwise ``{"LD_PRELOAD": ...}``
    (prepended to an existing value) plus ``OPENBLAS_CORETYPE`` unless the
    user set it.  ``environ`` defaults to ``os.environ``; when one is given
    (tests, planning a child's environment) the check of this process's own
    loaded libraries is skipped, so the answer depends on ``environ`` only.
    """
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or _machine() not in _X86 | _ARM64:
        return None
    if _opted_out(env) or _preloaded_blas(env):
        return None
    if environ is None and _global_blas_is_fast():
        return None
    lib = find_openblas()
    if lib is None:
        return None
    existing = env.get("LD_PRELOAD", "").strip()
    changes = {"LD_PRELOAD": f"{lib}:{existing}" if existing else lib}
    if "OPENBLAS_CORETYPE" not in env:
        core = openblas_coretype()
        if core:
            changes["OPENBLAS_CORETYPE"] = core
    return changes


def _reexec_argv(argv=None) -> list[str] | None:
    if argv is not None:
        return [sys.executable, *argv]
    orig = getattr(sys, "orig_argv", None)  # 3.10+: includes -m/-c and -X flags
    if orig:
        return [sys.executable, *orig[1:]]
    return [sys.executable, *sys.argv]


def maybe_reexec(argv=None) -> None:
    """Re-execute this interpreter once with a fast BLAS preloaded.

    Call it first thing in the CLI, before heavy imports.  It first points
    MLX's CPU JIT at vectorizing compiler flags (:func:`mlxpost.backend.jit.apply`,
    an environment change that needs no re-exec).  Then it does nothing when
    :func:`fast_blas_env` has no changes or when ``MLXPOST_REEXEC`` is set
    (the re-executed process sets it, so this can never loop).  ``argv``
    (without the interpreter) overrides ``sys.orig_argv``.  Returns normally
    when it does not re-exec, or when ``execve`` fails.
    """
    jit.apply()
    if os.environ.get(REEXEC_MARKER):
        return
    if not sys.executable or getattr(sys, "frozen", False):
        return
    changes = fast_blas_env()
    if not changes:
        return
    env = dict(os.environ)
    env.update(changes)
    env[REEXEC_MARKER] = "1"
    args = _reexec_argv(argv)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    try:
        os.execve(sys.executable, args, env)
    except OSError:
        return


def _bundled_reference_blas() -> str | None:
    """The mlx[cpu] wheel's bundled netlib BLAS, found without importing MLX."""
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        hits = glob.glob(os.path.join(entry, "mlx_cpu.libs", "libblas*.so*"))
        if hits:
            return hits[0]
    return None


def _install_hint() -> str:
    text = _read_text("/etc/os-release") or ""
    ids = " ".join(
        v.strip().strip('"').lower()
        for k, _, v in (ln.partition("=") for ln in text.splitlines())
        if k in ("ID", "ID_LIKE")
    ).split()
    if any(i in ids for i in ("fedora", "rhel", "centos")):
        return "sudo dnf install openblas-threads"
    if any(i in ids for i in ("arch", "manjaro")):
        return "sudo pacman -S openblas"
    if any(i in ids for i in ("suse", "opensuse")):
        return "sudo zypper install libopenblas_pthreads0"
    if "alpine" in ids:
        return "sudo apk add openblas"
    return "sudo apt-get install libopenblas0-pthread"


def blas_advice() -> str | None:
    """A one-line hint when MLX would use the slow reference BLAS, else None.

    Only on Linux x86_64/aarch64 with no OpenBLAS installed (when one is
    installed :func:`maybe_reexec` uses it).  Cheap: does not import MLX
    (it uses the loaded BLAS if MLX is already imported, else looks for the
    wheel's bundled library).  The CLI prints it once.
    """
    if not sys.platform.startswith("linux") or _machine() not in _X86 | _ARM64:
        return None
    if _opted_out() or _preloaded_blas() or find_openblas():
        return None
    if "mlx.core" in sys.modules:
        slow = loaded_blas(import_mlx=False)["name"] == "reference"
    else:
        slow = not _global_blas_is_fast() and _bundled_reference_blas() is not None
    return _ADVICE.format(install=_install_hint()) if slow else None
