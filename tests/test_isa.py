"""SPARSEKIT_ISA: the code path the C kernels start on (``make test-isa`` runs the runtime tests once per
path the CPU has); a path that is unknown or that the CPU lacks is one clear error line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sparsekit.runtime import layers as L

K = L._K
pytestmark = pytest.mark.skipif(K is None, reason="compiled kernels")
ALL_PATHS = ("generic", "avx2", "avx512")


def run_python(code: str, isa: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKIT_ISA"}
    if isa is not None:
        env["SPARSEKIT_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_this_process_runs_the_path_sparsekit_isa_names():
    # what makes a test-isa pass a test of that path and not of the CPU's best
    want = os.environ.get("SPARSEKIT_ISA") or "best"
    assert K.isa() == (K.available_isas()[-1] if want == "best" else want)


def test_available_paths_are_ordered_and_each_can_start_a_process():
    paths = K.available_isas()
    assert paths[0] == "generic" and list(paths) == list(ALL_PATHS[:len(paths)])
    code = "from sparsekit.runtime import _kernels as k; print(k.isa())"
    for isa in [*paths, "best", None]:
        res = run_python(code, isa)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == (paths[-1] if isa in ("best", None) else isa)


def _cli_error(isa: str) -> str:
    res = run_python("from sparsekit.cli.main import main; main(['run', 'm.fast.onnx', '--input', 'x.npy'])", isa)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr  # one line, no traceback
    return lines[0]


def test_an_unknown_path_is_one_error_line():
    have = ", ".join(K.available_isas())
    assert _cli_error("avx1024") == (f"error: SPARSEKIT_ISA=avx1024 is not a code path of sparsekit's kernels "
                                     f"(this CPU runs: {have}, or best); fix: unset SPARSEKIT_ISA or set it to "
                                     "one of those")


@pytest.mark.skipif(K is None or len(K.available_isas()) == len(ALL_PATHS), reason="this CPU has every path")
def test_a_path_the_cpu_lacks_is_one_error_line():
    lacking = ALL_PATHS[len(K.available_isas())]
    line = _cli_error(lacking)
    assert line.startswith(f"error: SPARSEKIT_ISA={lacking} names a code path this CPU lacks (this CPU runs: ")
