"""How CI splits the suite: `tools/cpu-beyond-avx2` decides whether `make test-kernels` needs its AVX2 pass, and
tests/conftest.py marks the tests that run alone (`wallclock`) and refuses one that is also `parity`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]

# first lines of /proc/cpuinfo's flags as Linux prints them (trimmed)
EPYC_AVX2 = "flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c avx2 bmi2"
EPYC_AVX512 = EPYC_AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16"
SAPPHIRE_RAPIDS = EPYC_AVX512 + " amx_bf16 amx_tile amx_int8"
ALDER_LAKE = EPYC_AVX2 + " avx_vnni"


def _beyond(tmp_path: Path, text: str | None) -> int:
    cpuinfo = tmp_path / "cpuinfo"
    if text is not None:
        cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: X\n{text}\n\nprocessor\t: 1\n{text}\n")
    env = dict(os.environ, TOKEN2WAV_CPUINFO=str(cpuinfo))
    return subprocess.run([str(ROOT / "tools" / "cpu-beyond-avx2")], env=env, timeout=30).returncode


@pytest.mark.parametrize(("flags", "code"), [
    (EPYC_AVX2, 1),  # AVX2 is the best: the AVX2 pass would repeat `make test`
    (EPYC_AVX512, 0),
    (SAPPHIRE_RAPIDS, 0),
    (ALDER_LAKE, 0),  # AVX-VNNI without AVX-512: oneDNN would use it unless limited
    ("Features\t: fp asimd evtstrm aes", 0),  # no flags line (an ARM CPU): run the pass rather than guess
    (None, 0),  # no cpuinfo at all
])
def test_cpu_beyond_avx2_reads_the_flags(tmp_path: Path, flags: str | None, code: int) -> None:
    assert _beyond(tmp_path, flags) == code


def _suite(pytester: pytest.Pytester, **modules: str) -> None:
    # run in a subprocess: this process may have imported the real test_server, test_browser, ... already
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(**modules)


def test_a_wallclock_module_and_a_marked_test_run_alone(pytester: pytest.Pytester) -> None:
    _suite(pytester, test_browser="def test_page():\n    pass\n",
           test_assembly="import pytest\n\n@pytest.mark.wallclock\ndef test_timed():\n    pass\n\n"
                         "def test_plain():\n    pass\n")
    alone = pytester.runpytest_subprocess("-m", "wallclock", "--collect-only", "-q")
    assert alone.ret == 0
    assert sorted(line for line in alone.outlines if "::" in line) == [
        "test_assembly.py::test_timed", "test_browser.py::test_page"]
    rest = pytester.runpytest_subprocess("-m", "not wallclock", "--collect-only", "-q")
    assert [line for line in rest.outlines if "::" in line] == ["test_assembly.py::test_plain"]


def test_a_parity_test_that_needs_an_idle_machine_is_refused(pytester: pytest.Pytester) -> None:
    # test_server is a parity module: the kernel passes would run this test beside another
    _suite(pytester, test_server="import pytest\n\n@pytest.mark.wallclock\ndef test_timed_audio():\n    pass\n")
    result = pytester.runpytest_subprocess("--collect-only", "-q")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*test_server.py::test_timed_audio compares floats (parity) and needs an idle "
                                 "machine (wallclock)*"])
