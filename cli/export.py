"""``sparsekit export``: a run dir or archive → validated deployable files (logic in sparsekit.exporters)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from sparsekit.cli.main import app
from sparsekit.cli.render import make_console, quiet_option

from sparsekit.errors import InputError


def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _status_cell(a: dict) -> str:
    if a["status"] == "refused":
        return f"refused: {a.get('reason', '')}"
    if a.get("slower_than_dense"):
        return f"[yellow]{a['status']}, slower than dense ⚠[/yellow]"
    return a["status"]


def _validation_cell(v: dict | None) -> str:
    if not v:
        return "-"
    if "max_abs_diff" in v and v.get("precision") == "fp32":
        return f"max|Δ| {v['max_abs_diff']:.0e}"
    if v.get("top1_agreement") is not None:
        drop = v.get("accuracy_drop_points")
        return f"agree {v['top1_agreement']:.1%}" + (f", -{drop:.2f} pt" if drop is not None else "")
    return str(v.get("outputs", "ok"))


@app.command("export")
def export_cmd(
    source: Path = typer.Argument(None, help="A run dir (from 'sparsekit train' or sparsekit.train()) or a "
                                  ".skz archive.", show_default=False),
    fmt: str = typer.Option(None, "--format", "-f",
                               help="Comma-separated formats or 'all'. See --list.",
                               show_default="all for a run dir, onnx for an archive"),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory.", show_default="RUN_DIR/export"),
    opset: int = typer.Option(18, "--opset", help="ONNX opset of the written files."),
    precision: str = typer.Option("fp32", "--precision",
                                  help="Value precision of the compressed archive: fp32 (bit-exact), fp16 or "
                                       "int8; comma-separated writes one archive each."),
    warn_only: bool = typer.Option(False, "--warn-only",
                                   help="Keep files that fail validation (marked in the report) instead of "
                                        "removing them and exiting 4.", show_default="off"),
    tune: bool = typer.Option(False, "--tune",
                              help="fast format: time every layer's kernels on this machine and keep the "
                                   "fastest per batch size (without it: a quick whole-model calibration).",
                              show_default="off"),
    tune_batch_size: int = typer.Option(1, "--tune-batch-size", min=1,
                                        help="fast format: batch size to plan for (besides the standard sizes from 1 to 256); "
                                             "a whole graph (CNN, Transformer) is also measured at it (up to 64) as well as "
                                             "at batch 1 when export chooses which convolutions stay sparse."),
    threads: int = typer.Option(1, "--threads", min=1, help="fast format: threads to plan for."),
    json_out: bool = typer.Option(False, "--json", help="Print the export report as JSON.", show_default="off"),
    list_formats: bool = typer.Option(False, "--list", help="List the export formats and exit.", show_default="off"),
    quiet: bool = quiet_option("Print nothing but errors (and --json output); export_report.json has it all."),
) -> None:
    """Export a trained run to validated ONNX and compressed files, and write export_report.json.

    Every file is checked with onnx.checker (full check, strict shape inference) and run in ONNX Runtime
    on the run's samples against the torch outputs (fp32: max|Δ| ≤ 1e-5·max(1, max|ref|); fp16/int8:
    top-1 agreement ≥ 99%, accuracy drop ≤ 0.5/1 point). A failure removes the file and exits 4. Speed
    formats (fast, compact-onnx, int8-onnx) that export measured below 0.95× of the dense model are
    flagged (status and slower_than_dense in the JSON); with 'all', such an int8-onnx is left out.
    compact-onnx is timed only by 'sparsekit report' (gate: --min-speedup-each). fast on a recurrent run
    (char-gru, char-lstm) also writes the one-step models model.step.onnx and model.step.fast.onnx (symbol
    and state in, logits and state out) for generation, checked against torch stepping; the sparse step
    only where it measured faster than the dense one.

    Example: sparsekit export runs/demo --format all && sparsekit export runs/demo/export/model.skz
    --format onnx --out restored; sparsekit export runs/demo --format fast --tune --tune-batch-size 64
    """
    from sparsekit.exporters import FORMATS
    from sparsekit.exporters.pipeline import export
    from sparsekit.exporters.speed import MIN_SPEEDUP, describe_slow

    if list_formats:
        if json_out:
            print(json.dumps([{"name": f.name, "suffix": f.suffix, "description": f.description}
                              for f in FORMATS.values()], indent=2))
            return
        table = Table(title="export formats")
        for col in ("name", "file", "description"):
            table.add_column(col)
        for f in FORMATS.values():
            table.add_row(f.name, f"model{f.suffix}", f.description)
        make_console().print(table)
        return
    if source is None:
        raise InputError("missing SOURCE", where="sparsekit export",
                         fix="pass a run dir or archive, e.g. 'sparsekit export runs/demo'")
    console = make_console(stderr=True, quiet=json_out or quiet)
    with console.status("exporting") as status:
        report = export(source, fmt, out, opset=opset, precision=precision, warn_only=warn_only,
                        tune=tune, tune_batch_size=tune_batch_size, threads=threads,
                        progress=lambda what: status.update(f"exporting {what}"))
    if json_out:
        print(json.dumps(report, indent=2))
        return
    if quiet:
        return
    table = Table(title=f"export of {report['source']} → {report['out_dir']}")
    for col in ("format", "file", "size", "dense/size", "validation", "status"):
        table.add_column(col, justify="right" if col in ("size", "dense/size") else "left")
    for a in report["artifacts"]:
        ratio = a.get("compression_vs_dense")
        table.add_row(a["format"] + ("" if a.get("precision", "fp32") == "fp32" else f" ({a['precision']})"),
                      Path(a["path"]).name, _fmt_bytes(a.get("bytes")),
                      f"{ratio:.2f}×" if ratio else "-",
                      _validation_cell(a.get("validation")), _status_cell(a))
    out_console = make_console()
    out_console.print(table)
    for a in report["artifacts"]:
        for note in a.get("notes", []):
            out_console.print(f"[dim]{a['format']}: {note}[/dim]")
    for a in report["artifacts"]:
        if a.get("slower_than_dense"):
            out_console.print(f"[yellow]⚠ {a['format']} is slower than the dense model: "
                              f"{describe_slow(a['slower_than_dense'])}, measured at export on this machine "
                              f"(below {MIN_SPEEDUP}×; gate: sparsekit report --min-speedup-each)[/yellow]")
