"""``sparsekit viz``: figures of a run (connectivity over training, densities, curves) or a loss overlay."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from sparsekit.cli.main import app
from sparsekit.cli.render import print_json, quiet_option


@app.command(epilog="Examples: sparsekit viz runs/rigl-0.9-s0 ; sparsekit viz --compare runs/a runs/b --out figs")
def viz(
    run_dirs: list[Path] = typer.Argument(..., help="A run directory (or several with --compare)."),
    out: Path = typer.Option(None, "--out", help="Where to write the PNG/GIF files.", show_default="RUN_DIR/viz; viz-compare with --compare"),
    compare: bool = typer.Option(False, "--compare", help="Overlay the loss curves of several runs.", show_default="off"),
    json_out: bool = typer.Option(False, "--json", help="Print the written files as JSON.", show_default="off"),
    quiet: bool = quiet_option("Do not list the written files."),
) -> None:
    """Write PNGs (and a GIF) of a run: first-layer input connectivity at each mask update (beside the
    mean input image for image inputs), where each layer's connections are (layers.png: per output/input
    channel and kernel position for convolutions, per q/k/v head for attention, per unit otherwise),
    planned vs realised per-layer density, loss/accuracy curves with updates marked."""
    from sparsekit.errors import InputError
    from sparsekit.viz import compare_runs, visualize

    if compare:
        result = compare_runs(run_dirs, out or Path("viz-compare"))
    else:
        if len(run_dirs) != 1:
            raise InputError("give one run directory (or --compare with several)", where="sparsekit viz",
                             fix="sparsekit viz RUN_DIR, or sparsekit viz --compare RUN_A RUN_B")
        result = visualize(run_dirs[0], out)
    if json_out:
        print_json(result)
    elif not quiet:
        for f in result["files"]:
            print(f, file=sys.stderr)
