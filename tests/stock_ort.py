"""Run an ONNX file where only onnxruntime and numpy are importable (no sparsekit, onnx or torch), as a user
without sparsekit would, and compare its first output with the expected one at the fp32 tolerance."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np


def stock_onnxruntime_output_matches(path: Path, x: np.ndarray, expected: np.ndarray, tmp_path: Path) -> None:
    """Asserts that stock ONNX Runtime alone runs ``path`` on ``x`` to ``expected`` (max|Δ| ≤ 1e-5·max(1, |ref|))."""
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected)
    only = tmp_path / "site"  # a site-packages holding numpy and onnxruntime alone
    only.mkdir()
    for pkg in ("numpy", "onnxruntime"):
        src = Path(importlib.util.find_spec(pkg).origin).parent  # type: ignore[arg-type, union-attr]
        (only / pkg).symlink_to(src)
        if (src.parent / f"{pkg}.libs").is_dir():  # the wheel's bundled shared libraries
            (only / f"{pkg}.libs").symlink_to(src.parent / f"{pkg}.libs")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:] = [{str(only)!r}] + [p for p in sys.path if "site-packages" not in p]
        for name in ("sparsekit", "onnx", "torch"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(name + " is importable")
        import numpy as np, onnxruntime as ort
        sess = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        got = sess.run(None, {{sess.get_inputs()[0].name: np.load({str(tmp_path / 'x.npy')!r})}})[0]
        ref = np.load({str(tmp_path / 'expected.npy')!r})
        diff, bound = float(np.abs(got - ref).max()), 1e-5 * max(1.0, float(np.abs(ref).max()))
        print("ok" if diff <= bound else f"max |d| {{diff}} > {{bound}}")
    """)
    # -I: no PYTHON* variables, user site or current directory; -S: no site-packages (nor editable installs)
    res = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok", res.stdout
