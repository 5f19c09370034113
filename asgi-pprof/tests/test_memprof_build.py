"""The C extension's build: warnings are errors, an interpreter it does not support gets a stub
that says why, and the sampler's tests run clean against a build with AddressSanitizer and UBSan.

The sanitized run takes a minute or two: every Python block goes through malloc
(PYTHONMALLOC=malloc), so that ASan sees the service's blocks that the hooks touch, not only the
sampler's own tables. Free-threaded builds refuse PYTHONMALLOC=malloc: there ASan sees the
sampler's own memory only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parent.parent
PACKAGE_SOURCE = LIBRARY / "src" / "asgi_pprof"  # the sanitized run builds and runs the sources
SOURCE = PACKAGE_SOURCE / "_memprof.c"
WARNINGS = ["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wsign-compare", "-Wshadow"]
SANITIZED_TESTS = [
    "tests/test_sampling.py",
    "tests/test_sampled_profiles.py",
    "tests/test_sampler_bounds.py",
    "tests/test_sampler_threads.py",
    "tests/test_labels.py",
]
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
UNDER_SANITIZER = "ASGI_PPROF_UNDER_SANITIZER"

if os.environ.get(UNDER_SANITIZER):
    pytest.skip("already under the sanitizer", allow_module_level=True)


def compile_extension(gcc: str, output: Path, include: str, *flags: str) -> None:
    command = [gcc, *WARNINGS, "-fPIC", "-shared", f"-I{include}", *flags, str(SOURCE)]
    result = subprocess.run(
        [*command, "-o", str(output), "-lm"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_the_extension_compiles_with_warnings_as_errors(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    gcc = require_tool("gcc")
    include = sysconfig.get_paths()["include"]
    for level in ("-O0", "-O2", "-O3"):
        compile_extension(gcc, tmp_path / f"memprof{level}.so", include, level)


def test_a_stub_build_refuses_with_the_reason(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    """Where the interpreter is not one it supports (free-threaded 3.14, 3.15...), the module
    builds as a stub whose import raises ImportError with the reason, and asgi_pprof.sampling
    passes it on while its tracemalloc profile stays. The stub is made here for this interpreter
    by naming a reason at build time, as _memprof_python.h does for the others."""
    gcc = require_tool("gcc")
    package = tmp_path / "asgi_pprof"
    shutil.copytree(PACKAGE_SOURCE, package, ignore=_compiled)
    reason = '-DMEMPROF_UNSUPPORTED_REASON="interpreters other than this test\'s"'
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    include = sysconfig.get_paths()["include"]
    compile_extension(gcc, package / f"_memprof{suffix}", include, "-O2", reason)
    probe = (
        "from asgi_pprof import sampling\n"
        "print(sampling.available(), sampling.unavailable_reason())\n"
        "try:\n    sampling.start()\nexcept sampling.SamplingUnavailable as error:\n"
        "    print('refused:', error)\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert output.returncode == 0, output.stderr
    assert output.stdout.startswith("False ")
    assert "supports interpreters other than this test's (this is 3." in output.stdout
    assert "refused:" in output.stdout and "tracemalloc heap profile is still available" in (
        output.stdout
    )


def _compiled(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if name.endswith(".so") or name == "__pycache__"]


def test_the_sampler_tests_run_clean_under_address_sanitizer(
    tmp_path: Path, require_tool: Callable[[str], str]
) -> None:
    gcc = require_tool("gcc")
    runtime = subprocess.check_output([gcc, "-print-file-name=libasan.so"], text=True).strip()
    assert os.path.isabs(runtime), "gcc has no libasan (Debian: libasan8, with gcc)"
    package = tmp_path / "asgi_pprof"
    shutil.copytree(PACKAGE_SOURCE, package, ignore=_compiled)
    sanitize = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"]
    sanitize.append("-fno-sanitize-recover=all")  # any finding stops the run
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    compile_extension(
        gcc, package / f"_memprof{suffix}", sysconfig.get_paths()["include"], *sanitize
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),  # before site-packages: this build, not the installed one
        "LD_PRELOAD": runtime,  # ASan's runtime first: python itself is not sanitized
        "ASGI_PPROF_STRESS_SECONDS": "2",  # ASan is slow: the stress asserts counts, not time
        # Python's own leaks at exit are not ours; tests ask malloc for 2**62 bytes on purpose.
        # Findings also go to files: a report that halts the run may beat its own stderr.
        "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:"
        f"log_path={tmp_path / 'asan'}",
        "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={tmp_path / 'ubsan'}",
        UNDER_SANITIZER: "1",
    }
    if not FREE_THREADED:
        env["PYTHONMALLOC"] = "malloc"
    which = subprocess.run(
        [sys.executable, "-c", "from asgi_pprof import _memprof; print(_memprof.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert which.returncode == 0, which.stderr
    assert which.stdout.strip().startswith(str(package))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SANITIZED_TESTS],
        capture_output=True, text=True, env=env, cwd=LIBRARY, timeout=900,
    )  # fmt: skip
    print(run.stdout[-3000:])
    reports = "".join(path.read_text() for path in sorted(tmp_path.glob("*san.*")))
    findings = [  # the 2**62-byte requests are refused with a warning: not a finding
        line
        for line in (run.stderr + reports).splitlines()
        if ("Sanitizer" in line and "failed to allocate" not in line) or "runtime error" in line
    ]
    assert findings == [], (reports or run.stderr)[-6000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
