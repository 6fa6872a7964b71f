"""The wheel installs cli/ and exporters/ as sparsekit.cli / sparsekit.exporters, never top level."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_maps_cli_and_exporters_under_sparsekit(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("sparsekit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sparsekit/cli/main.py" in names and "sparsekit/exporters/registry.py" in names
    assert "sparsekit/schemas/summary.schema.json" in names
    assert not any(n.startswith(("cli/", "exporters/")) for n in names)
    # Install into a scratch target (dependencies come from this environment) and import from there.
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-2000:]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import sparsekit.cli.main, sparsekit.exporters; "
            "import importlib.util as u; assert u.find_spec('cli') is None or 'site' not in str(u.find_spec('cli')); "
            "print(sparsekit.cli.main.__file__); print(sparsekit.exporters.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    files = out.stdout.split()
    assert all(f.startswith(str(target)) for f in files), files
