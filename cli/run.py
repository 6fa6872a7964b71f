"""``sparsekit run``: run a ``fast`` artifact on a .npy input with sparsekit's kernels (logic in
sparsekit.runtime)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer
from sparsekit.cli.main import app
from sparsekit.cli.render import quiet_option

from sparsekit.errors import InputError


def _load_input(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"input {path} not found", where="--input", fix="pass an existing .npy file")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {path} as a .npy array: {reason}", where="--input",
                         fix="save the input with numpy.save (no pickled objects)") from exc


@app.command("run")
def run_cmd(
    artifact: Path = typer.Argument(..., help="A .fast.onnx file from 'sparsekit export --format fast'."),
    input_path: Path = typer.Option(..., "--input", "-i", help="Input .npy array, shape (batch, *input_shape)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the outputs here (.npy).", show_default="print them"),
    threads: int = typer.Option(1, "--threads", min=1, help="Threads for the kernels."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout.", show_default="off"),
    quiet: bool = quiet_option("No timing line: only the outputs (none with --output) and warnings."),
) -> None:
    """Run a fast artifact on an input array and print or save the outputs.

    Example: sparsekit run runs/demo/export/model.fast.onnx --input x.npy --output y.npy --threads 2
    """
    from sparsekit.fileio import atomic_path
    from sparsekit.runtime import load

    model = load(artifact, threads=threads)
    x = _load_input(input_path)
    start = time.perf_counter()
    y = model.run(x)
    seconds = time.perf_counter() - start
    for note in model.notes:  # plan entries replaced to fit its memory bound, or re-planned for this CPU
        typer.echo(f"warning: {note}", err=True)
    if output is not None:
        with atomic_path(output) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, y)
    if json_out:
        print(json.dumps({"artifact": str(artifact), "input_shape": list(x.shape), "output_shape": list(y.shape),
                          "output": str(output) if output is not None else None,
                          "seconds": round(seconds, 6), "threads": threads,
                          "kernels": model.kernels_used() if hasattr(model, "kernels_used")
                          else model.kernels_for(int(x.shape[0])), "isa": model.info()["isa"],
                          "notes": list(model.notes),
                          **({} if output is not None else {"outputs": y.tolist()})}))
        return
    if output is None:
        with np.printoptions(precision=5, suppress=True, threshold=200):
            print(y)
    if quiet:
        return
    typer.echo(f"ran {artifact.name} on {x.shape[0]} samples in {seconds * 1e3:.3f} ms "
               f"({threads} thread{'s' if threads > 1 else ''}; kernels {', '.join(model.kernels_for(int(x.shape[0])))})"
               + (f"; wrote {output}" if output is not None else ""), err=output is None)
