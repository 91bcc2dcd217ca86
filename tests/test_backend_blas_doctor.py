"""Tests for mlxpost.backend.blas: BLAS detection, the LD_PRELOAD re-exec, doctor rows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlxpost.backend import blas as system
from mlxpost.backend import doctor

LINUX = sys.platform.startswith("linux")

CPUINFO_AVX512 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512dq \
avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi
"""

CPUINFO_AVX2 = """\
processor\t: 0
model name\t: Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2
"""

# Knights Landing: AVX-512F/CD but no BW/DQ/VL, so Skylake-X kernels would fault.
CPUINFO_KNL = """\
model name\t: Intel(R) Xeon Phi(TM) CPU 7210 @ 1.30GHz
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512cd avx512pf avx512er
"""

CPUINFO_SSE = """\
model name\t: Intel(R) Core(TM)2 Duo CPU
flags\t\t: fpu vme sse sse2 ssse3 sse4_1
"""

CPUINFO_ARM = """\
processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""


@pytest.mark.parametrize(
    "text, expected",
    [
        (CPUINFO_AVX512, "SkylakeX"),
        (CPUINFO_AVX2, "Haswell"),
        (CPUINFO_KNL, "Haswell"),
        (CPUINFO_SSE, None),
        (CPUINFO_ARM, None),
        ("", None),
    ],
)
def test_coretype_from_cpuinfo(text, expected):
    assert system.coretype_from_cpuinfo(text) == expected


def test_coretype_never_names_a_missing_core_on_this_machine():
    core = system.openblas_coretype()
    if not LINUX or core is None:
        return
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    need = {"SkylakeX": {"avx512f"}, "Haswell": {"avx2"}}[core]
    assert need <= flags


@pytest.mark.parametrize(
    "path, name, fast",
    [
        ("/x/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0", "reference", False),
        ("/usr/lib/x86_64-linux-gnu/blas/libblas.so.3", "reference", False),
        ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so", "openblas", True),
        ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3", "openblas", True),
        ("/opt/intel/lib/libmkl_rt.so.2", "mkl", True),
        ("/usr/lib/libblis.so.4", "blis", True),
        ("/usr/lib64/libflexiblas.so.3", "flexiblas", None),
        ("/usr/lib/libsomething.so", "unknown", None),
    ],
)
def test_classify_blas_path(path, name, fast):
    assert system.classify_blas_path(path) == (name, fast)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE", system.OPT_OUT_VAR,
                        system.REEXEC_MARKER)}
    env.update(extra)
    return env


FAKE_LIB = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


@pytest.fixture
def fake_linux(monkeypatch):
    """Pretend to be x86_64 Linux with an OpenBLAS installed."""
    monkeypatch.setattr(system.sys, "platform", "linux")
    monkeypatch.setattr(system, "_machine", lambda: "x86_64")
    monkeypatch.setattr(system, "find_openblas", lambda: FAKE_LIB)
    monkeypatch.setattr(system, "openblas_coretype", lambda: "Haswell")
    monkeypatch.setattr(system, "_global_blas_is_fast", lambda: False)


def test_fast_blas_env_changes(fake_linux):
    assert system.fast_blas_env(_clean_env()) == {
        "LD_PRELOAD": FAKE_LIB,
        "OPENBLAS_CORETYPE": "Haswell",
    }


def test_fast_blas_env_prepends_to_unrelated_preload(fake_linux):
    env = _clean_env(LD_PRELOAD="/usr/lib/libjemalloc.so.2")
    assert system.fast_blas_env(env)["LD_PRELOAD"] == f"{FAKE_LIB}:/usr/lib/libjemalloc.so.2"


def test_fast_blas_env_keeps_user_coretype(fake_linux):
    changes = system.fast_blas_env(_clean_env(OPENBLAS_CORETYPE="Zen"))
    assert changes == {"LD_PRELOAD": FAKE_LIB}


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "OFF"])
def test_fast_blas_env_opt_out(fake_linux, value):
    assert system.fast_blas_env(_clean_env(MLXPOST_SYSTEM_BLAS=value)) is None


@pytest.mark.parametrize(
    "preload",
    [
        "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
        "/usr/lib/libjemalloc.so.2:/opt/openblas/lib/libopenblas.so",
        "/opt/intel/oneapi/mkl/lib/libmkl_rt.so.2",
    ],
)
def test_fast_blas_env_already_preloaded(fake_linux, preload):
    assert system.fast_blas_env(_clean_env(LD_PRELOAD=preload)) is None


def test_fast_blas_env_no_openblas(fake_linux, monkeypatch):
    monkeypatch.setattr(system, "find_openblas", lambda: None)
    assert system.fast_blas_env(_clean_env()) is None


def test_fast_blas_env_not_linux(fake_linux, monkeypatch):
    monkeypatch.setattr(system.sys, "platform", "darwin")
    assert system.fast_blas_env(_clean_env()) is None


@pytest.fixture
def execve_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(system.os, "execve", lambda *a: calls.append(a))
    return calls


def test_maybe_reexec_respects_marker(fake_linux, monkeypatch, execve_calls):
    monkeypatch.setenv(system.REEXEC_MARKER, "1")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    system.maybe_reexec(["-c", "pass"])
    assert execve_calls == []


def test_maybe_reexec_respects_opt_out(fake_linux, monkeypatch, execve_calls):
    monkeypatch.delenv(system.REEXEC_MARKER, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv(system.OPT_OUT_VAR, "0")
    system.maybe_reexec(["-c", "pass"])
    assert execve_calls == []


def test_maybe_reexec_execs_with_marker(fake_linux, monkeypatch, execve_calls):
    monkeypatch.delenv(system.REEXEC_MARKER, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.delenv(system.OPT_OUT_VAR, raising=False)
    system.maybe_reexec(["-m", "mlxpost", "train"])
    assert len(execve_calls) == 1
    exe, args, env = execve_calls[0]
    assert exe == sys.executable
    assert args == [sys.executable, "-m", "mlxpost", "train"]
    assert env[system.REEXEC_MARKER] == "1"
    assert env["LD_PRELOAD"] == FAKE_LIB
    assert env["OPENBLAS_CORETYPE"] == "Haswell"


def test_maybe_reexec_defaults_to_orig_argv(fake_linux, monkeypatch, execve_calls):
    monkeypatch.delenv(system.REEXEC_MARKER, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(system.OPT_OUT_VAR, raising=False)
    monkeypatch.setattr(system.sys, "orig_argv", ["python3", "-X", "dev", "-m", "mlxpost"],
                        raising=False)
    system.maybe_reexec()
    assert execve_calls[0][1] == [sys.executable, "-X", "dev", "-m", "mlxpost"]


def test_blas_advice_when_reference_would_be_used(fake_linux, monkeypatch):
    monkeypatch.setattr(system, "find_openblas", lambda: None)
    monkeypatch.setattr(system, "_bundled_reference_blas", lambda: "/x/mlx_cpu.libs/libblas.so")
    monkeypatch.setattr(system, "loaded_blas",
                        lambda import_mlx=True: {"name": "reference", "path": "x", "fast": False})
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(system.OPT_OUT_VAR, raising=False)
    advice = system.blas_advice()
    assert advice and "reference BLAS" in advice and "openblas" in advice.lower()
    assert "\n" not in advice
    # Installed: the re-exec handles it, no advice.
    monkeypatch.setattr(system, "find_openblas", lambda: FAKE_LIB)
    assert system.blas_advice() is None


def test_loaded_blas_known_name():
    info = system.loaded_blas()
    assert info["name"] in {"openblas", "mkl", "blis", "flexiblas", "accelerate", "reference"}
    assert set(info) >= {"name", "path", "fast"}
    if LINUX:
        assert info["path"] and os.path.exists(info["path"])


@pytest.mark.skipif(not LINUX, reason="/proc/self/maps is Linux only")
def test_loaded_blas_ignores_numpy_openblas():

    info = system.loaded_blas()
    assert "numpy.libs" not in (info["path"] or "")


def test_find_openblas_is_a_file():
    path = system.find_openblas()
    if path is not None:
        assert os.path.isfile(path)


def test_doctor_rows(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXPOST_CACHE", str(tmp_path))  # no peak cached here
    rows = doctor.doctor_rows(measure=False)
    assert [r[0] for r in rows] == list(doctor.DOCTOR_ITEMS)
    for item, value, status in rows:
        assert isinstance(value, str) and value
        assert status in {"ok", "warn", "info"}, (item, status)
    d = {r[0]: r for r in rows}
    assert d["matmul fp32"][1] == "not measured"
    from mlxpost.backend import jit

    if jit.active():  # the test session applies the JIT flags as the CLI does
        assert d["jit flags"][2] == "ok" and "-march=native" in d["jit flags"][1]
    assert d["hf token"][1].split()[0] in {"yes", "no"}
    import mlx.core as mx

    doctor.save_peak(mx, {"float32": {"gflops": 12.5, "size": 512}})
    d = {r[0]: r for r in doctor.doctor_rows(measure=False)}
    assert d["matmul fp32"][1] == "not measured (cached peak: 12.5 GFLOP/s)"


def test_doctor_never_prints_hf_token(monkeypatch):
    secret = "hf_" + "Zq9" * 12
    monkeypatch.setenv("HF_TOKEN", secret)
    rows = doctor.doctor_rows(measure=False)
    assert all(secret not in v for _, v, _ in rows)
    assert dict((r[0], r[1]) for r in rows)["hf token"].startswith("yes")


def test_doctor_measures_matmul(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXPOST_CACHE", str(tmp_path))  # the measured peak is cached there
    rows = dict((r[0], r) for r in doctor.doctor_rows(measure=True))
    _, value, status = rows["matmul fp32"]
    assert "GFLOP/s" in value
    assert status in {"ok", "warn"}
    assert (tmp_path / doctor.PEAK_FILE).exists()


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD re-exec is Linux only")
def test_reexec_subprocess_uses_openblas():
    lib = system.find_openblas()
    if lib is None:
        pytest.skip("no system OpenBLAS installed (e.g. apt-get install libopenblas0-pthread)")
    code = (
        "import mlxpost.backend.blas as s; s.maybe_reexec(); import mlx.core as mx; "
        "print(s.loaded_blas()['name'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True,
        timeout=120, check=True,
    )
    assert out.stdout.strip() == "openblas", out.stderr


def test_peak_is_measured_cached_and_read_back(tmp_path):
    import mlx.core as mx

    assert doctor.cached_peak(mx, cache=tmp_path) is None  # never measured: no peak, never an invented one
    peaks = doctor.measure_peak(mx, ("float32",), sizes=(64, 128), runs=2)
    assert peaks["float32"]["size"] in (64, 128) and peaks["float32"]["gflops"] > 0
    doctor.save_peak(mx, peaks, cache=tmp_path)
    got = doctor.cached_peak(mx, cache=tmp_path)
    assert got["gflops"] == peaks["float32"]["gflops"] and got["key"] == doctor.peak_key(mx)
    assert doctor.cached_peak(mx, "bfloat16", cache=tmp_path) is None
    (tmp_path / doctor.PEAK_FILE).write_text("{not json")
    assert doctor.cached_peak(mx, cache=tmp_path) is None
