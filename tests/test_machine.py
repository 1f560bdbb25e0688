"""The machine description every figure carries tells apart CPUs that share a model name ("AMD EPYC" names Zen 3
without AVX-512 and Zen 4/5 with it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanformer import _machine
from leanformer._machine import SIMD_FLAGS, machine_info

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse4_2 avx avx2 fma f16c

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
"""


def test_family_model_and_simd_flags_are_recorded(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text(CPUINFO)
    real_path = _machine.Path
    monkeypatch.setattr(_machine, "Path", lambda p: fake if p == "/proc/cpuinfo" else real_path(p))
    info = machine_info()
    assert (info["cpu"], info["cpu_vendor"], info["cpu_family"], info["cpu_model"], info["cpu_stepping"]) == \
        ("AMD EPYC", "AuthenticAMD", 25, 1, 1)
    assert info["cpu_flags"] == ["sse4_2", "avx", "avx2", "fma", "f16c"]  # no avx512f: a Zen 3


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="Linux only")
def test_this_machine_is_described():
    info = machine_info()
    assert info["cpu_vendor"] and isinstance(info["cpu_family"], int)
    assert set(info["cpu_flags"]) <= set(SIMD_FLAGS)
