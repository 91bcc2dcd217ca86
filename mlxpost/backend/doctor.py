"""``mlxpost doctor``: the MLX backend, BLAS, JIT flags, memory and versions, one row each."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from . import jit
from .blas import (
    OPT_OUT_VAR,
    _machine,
    _opted_out,
    _preloaded_blas,
    _read_text,
    blas_advice,
    find_openblas,
    loaded_blas,
    openblas_coretype,
)

DOCTOR_ITEMS = (
    "platform",
    "cpu",
    "python",
    "mlx",
    "mlx-lm",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "numpy",
    "mlx device",
    "metal",
    "cuda",
    "blas",
    "OPENBLAS_CORETYPE",
    "threads",
    "matmul fp32",
    "memory total",
    "memory available",
    "g++",
    "jit flags",
    "hf token",
    "cache dir",
)

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _cpu_model() -> str:
    model = None
    if sys.platform == "darwin":
        try:
            model = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True, text=True, timeout=5, check=False,
            ).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        for line in (_read_text("/proc/cpuinfo") or "").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("model name", "Model", "cpu model"):
                model = value.strip()
                break
    model = model or platform.processor() or _machine()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    total = os.cpu_count() or usable
    cores = f"{usable} cpus" if usable == total else f"{usable} of {total} cpus usable"
    return f"{model}, {cores}"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = (_read_text(path) or "").strip()
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def _memory() -> tuple[int | None, int | None]:
    """(total, available) bytes; either may be None."""
    total = avail = None
    if sys.platform.startswith("linux"):
        info = {}
        for line in (_read_text("/proc/meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                info[key] = int(parts[0]) * 1024
        total, avail = info.get("MemTotal"), info.get("MemAvailable")
    elif sys.platform == "darwin":
        try:
            total = int(subprocess.run(
                ["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                timeout=5, check=False,
            ).stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout
            page = int(re.search(r"page size of (\d+)", out).group(1))
            pages = sum(
                int(m.group(2))
                for m in re.finditer(r"Pages (free|inactive|speculative):\s+(\d+)", out)
            )
            avail = pages * page
        except Exception:
            pass
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    return total, avail


def _hf_token_source() -> str | None:
    """Where a Hugging Face token comes from (never the token itself)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return f"{var} env"
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    path = os.environ.get("HF_TOKEN_PATH") or os.path.join(hf_home, "token")
    try:
        if os.path.getsize(path) > 0:
            return "token file"
    except OSError:
        pass
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("MLXPOST_CACHE") or Path.home() / ".cache" / "mlxpost").expanduser()


def _measure_matmul(mx, n: int = 1024, reps: int = 5, dtype=None) -> float:
    """GFLOP/s of an ``n x n`` by ``n x n`` matmul (``2 n^3`` FLOPs), the mean of ``reps`` after a warm-up."""
    dtype = dtype or mx.float32
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b)
    mx.eval(a @ b)  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    dt = (time.perf_counter() - t0) / reps
    return 2 * n**3 / dt / 1e9


PEAK_FILE = "matmul_peak.json"
PEAK_SIZES = (512, 1024, 2048)


def peak_key(mx) -> str:
    """What a measured peak belongs to: CPU model and cores, MLX device and version, the loaded BLAS.

    A peak measured under another BLAS (OpenBLAS preloaded or not) or another
    MLX is a different machine as far as matmul speed goes.
    """
    return " | ".join([_cpu_model(), str(mx.default_device()), f"mlx {_version('mlx')}",
                       f"blas {loaded_blas(import_mlx=True)['name']}"])


def measure_peak(mx, dtypes: tuple[str, ...] = ("float32",), sizes: tuple[int, ...] = PEAK_SIZES,
                 runs: int = 3) -> dict:
    """The best matmul GFLOP/s over ``sizes`` and ``runs`` per dtype: ``{dtype: {"gflops", "size"}}``.

    The best, not the mean: a peak is what the hardware can reach, and a
    shared machine only ever makes a run slower. Sizes above 1024 show what
    large matmuls (a training step's) reach once the BLAS has warmed its threads.
    """
    out = {}
    for name in dtypes:
        dtype = getattr(mx, name)
        best, at = 0.0, None
        for n in sizes:
            for _ in range(runs):
                g = _measure_matmul(mx, n, reps=3 if n <= 1024 else 2, dtype=dtype)
                if g > best:
                    best, at = g, n
        out[name] = {"gflops": round(best, 2), "size": at}
    return out


def save_peak(mx, peaks: dict, cache: Path | None = None) -> Path:
    """Store measured peaks under this machine's :func:`peak_key` in ``<cache>/matmul_peak.json``."""
    path = (cache or _cache_dir()) / PEAK_FILE
    data = _read_peaks(path)
    entry = data.setdefault(peak_key(mx), {})
    entry.update({k: {**v, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                  for k, v in peaks.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mlxpost.files: that imports mlx, see doctor_rows
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def cached_peak(mx, dtype: str = "float32", cache: Path | None = None) -> dict | None:
    """The peak ``mlxpost doctor`` measured on this machine for ``dtype``: ``{"gflops", "size", "measured",
    "key"}``, or None when it never did (training then reports MFU as unknown, never an invented peak)."""
    key = peak_key(mx)
    entry = _read_peaks((cache or _cache_dir()) / PEAK_FILE).get(key, {}).get(dtype)
    if not isinstance(entry, dict) or not isinstance(entry.get("gflops"), (int, float)) or entry["gflops"] <= 0:
        return None
    return {**entry, "key": key}


def _read_peaks(path: Path) -> dict:
    """The peak cache; a missing or damaged file is an empty cache (it is rewritten by the next doctor)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


Row = tuple[str, str, str]  # (item, value, status): status "ok" / "warn" / "info"


def doctor_rows(measure: bool = True) -> list[Row]:
    """Rows of ``(item, value, status)`` with status "ok" / "warn" / "info".

    Items are :data:`DOCTOR_ITEMS`, in that order.  Never raises for a missing
    package or an API an MLX build lacks; never shows the Hugging Face token.
    """
    try:  # here, not at the top: doctor reports an MLX that fails to load instead of crashing on it
        import mlx.core as mx

        mlx_error = None
    except Exception as e:  # noqa: BLE001
        mx, mlx_error = None, f"mlx.core import failed: {type(e).__name__}: {e}"
    rows = (_system_rows() + _package_rows() + _device_rows(mx, mlx_error) + [_blas_row(mx)] + _thread_rows()
            + [_matmul_row(mx, measure)] + _memory_rows(mx) + _compiler_rows() + _hub_rows())
    return [(item, str(value), status) for item, value, status in rows]


def _system_rows() -> list[Row]:
    py_ok = sys.version_info >= (3, 10)
    return [("platform", f"{platform.system()} {platform.release()} ({_machine()})", "info"),
            ("cpu", _cpu_model(), "info"),
            ("python", f"{platform.python_version()} ({sys.executable})", "ok" if py_ok else "warn")]


def _package_rows() -> list[Row]:
    required = {"mlx", "mlx-lm", "tokenizers", "huggingface_hub", "numpy"}
    rows = []
    for dist in ("mlx", "mlx-lm", "transformers", "tokenizers", "huggingface_hub", "numpy"):
        v = _version(dist)
        if v is None:
            rows.append((dist, "not installed", "warn" if dist in required else "info"))
            continue
        extra = ""
        if dist == "mlx" and _version("mlx-cpu"):
            extra = " (CPU backend wheel)"
        elif dist == "mlx" and _version("mlx-cuda"):
            extra = " (CUDA backend wheel)"
        rows.append((dist, v + extra, "ok"))
    return rows


def _device_rows(mx, error: str | None) -> list[Row]:
    if mx is None:
        return [(item, error, "warn") for item in ("mlx device", "metal", "cuda")]

    def available(name: str) -> bool | None:
        try:
            return bool(getattr(mx, name).is_available())
        except Exception:  # noqa: BLE001 - an MLX build without that backend
            return None

    try:
        rows = [("mlx device", str(mx.default_device()), "info")]
    except Exception as e:  # noqa: BLE001
        rows = [("mlx device", f"unknown ({e})", "warn")]
    metal, cuda = available("metal"), available("cuda")
    said = {True: "available", False: "not available", None: "unknown"}
    rows.append(("metal", said[metal], "ok" if metal else ("warn" if sys.platform == "darwin" else "info")))
    rows.append(("cuda", said[cuda], "ok" if cuda else "info"))
    return rows


def _blas_row(mx) -> Row:
    blas = loaded_blas(import_mlx=mx is not None)
    value = blas["name"]
    for key, shown in (("config", " [{}]"), ("core", " core={}"), ("threads", " threads={}"), ("path", " {}")):
        if blas.get(key):
            value += shown.format(blas[key])
    if _preloaded_blas():
        value += " (via LD_PRELOAD)"
    if blas["fast"] is True:
        return "blas", value, "ok"
    if blas["name"] != "reference":
        return "blas", value, "info"
    advice = blas_advice()
    if advice:
        value += f" -- {advice}"
    elif find_openblas():
        value += f" -- {find_openblas()} is installed but not preloaded" + (
            f" ({OPT_OUT_VAR}=0 is set)" if _opted_out() else "; the mlxpost CLI preloads it automatically")
    return "blas", value, "warn"


def _thread_rows() -> list[Row]:
    ct, rec = os.environ.get("OPENBLAS_CORETYPE"), openblas_coretype()
    if ct is not None:
        core = ct + (f" (recommended: {rec})" if rec and rec != ct else "")
    else:
        core = "unset" + (f" (recommended: {rec})" if rec else "")
    threads = ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in _THREAD_VARS)
    return [("OPENBLAS_CORETYPE", core, "info"), ("threads", threads, "info")]


def _matmul_row(mx, measure: bool) -> Row:
    """The matmul peak (fp32 and the training dtype where that differs), measured and cached for training's
    MFU; without measuring, the cached peak if there is one."""
    if mx is None:
        return "matmul fp32", "mlx unavailable", "info"
    dtypes = tuple(dict.fromkeys(("float32", "float32" if mx.default_device() == mx.cpu else "bfloat16")))
    if not measure:
        peak = cached_peak(mx)
        return "matmul fp32", f"not measured (cached peak: {peak['gflops']:.1f} GFLOP/s)" if peak else "not measured", "info"
    try:
        peaks = measure_peak(mx, dtypes)
        path = save_peak(mx, peaks)
    except Exception as e:  # noqa: BLE001
        return "matmul fp32", f"failed: {type(e).__name__}: {e}", "warn"
    gflops = peaks["float32"]["gflops"]
    shown = ", ".join(f"{k} {v['gflops']:.1f} GFLOP/s ({v['size']}x{v['size']})" for k, v in peaks.items())
    return ("matmul fp32", f"peak {shown} on {mx.default_device()}; cached in {path} for MFU",
            "ok" if gflops >= 20 else "warn")


def _memory_rows(mx) -> list[Row]:
    total, avail = _memory()
    limit = _cgroup_limit() if sys.platform.startswith("linux") else None
    capped = bool(limit and total and limit < total)
    shown = _gib(total) if total else "unknown"
    if capped:
        shown += f" (cgroup limit {_gib(limit)})"
    if mx is not None:
        try:
            ws = mx.device_info().get("max_recommended_working_set_size")  # the CPU backend has no Metal keys
            if ws:
                shown += f" (Metal working set {_gib(ws)})"
        except Exception:  # noqa: BLE001
            pass
    rows = [("memory total", shown, "info")]
    if avail is None:
        return rows + [("memory available", "unknown", "info")]
    avail = min(avail, limit) if capped else avail
    return rows + [("memory available", _gib(avail), "ok" if avail >= 2 * 2**30 else "warn")]


def _compiler_rows() -> list[Row]:
    linux = sys.platform.startswith("linux")
    # The real compiler, not the shim of mlxpost.backend.jit that comes first on PATH.
    gxx = shutil.which("g++", path=jit.without_shim(os.environ.get("PATH", os.defpath)))
    if gxx:
        rows = [("g++", gxx, "ok")]
    elif linux:
        rows = [("g++", "not found: mx.compile silently runs unfused on the CPU (install g++)", "warn")]
    else:
        rows = [("g++", "not found (not needed on this platform)", "info")]
    if jit.active():
        return rows + [("jit flags", f"{os.environ[jit.ACTIVE_VAR]} (vectorized CPU kernels; cache in "
                                     f"{os.environ.get('TMPDIR', '/tmp')}/mlx)", "ok")]
    if not (linux and gxx and _machine() in ("x86_64", "amd64")):
        return rows + [("jit flags", "not used on this platform", "info")]
    if jit.opted_out():
        why = f"{jit.OPT_OUT_VAR}=0 is set"
    elif jit.jit_env() is None:
        why = f"could not be set up: {gxx} rejects them, or TMPDIR gives no private executable directory"
    else:
        why = "the mlxpost command applies them"
    return rows + [("jit flags", f"not applied ({why}): MLX's CPU kernels run scalar", "info")]


def _hub_rows() -> list[Row]:
    src = _hf_token_source()
    rows = [("hf token", f"yes ({src})" if src else "no", "info")]
    cache = _cache_dir()
    if not cache.exists():
        return rows + [("cache dir", f"{cache} (not created yet)", "info")]
    writable = os.access(cache, os.W_OK)
    return rows + [("cache dir", f"{cache}" + ("" if writable else " (not writable)"), "info" if writable else "warn")]
