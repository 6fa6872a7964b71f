"""``sparsekit report``: counts, sizes, accuracy and measured latency (logic in sparsekit.exporters.report)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from sparsekit.cli.main import app
from sparsekit.cli.render import make_console, quiet_option

from sparsekit.errors import InputError


def _ints(spec: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in spec.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise InputError(f"{option} {spec!r} is not a list of positive integers", where=option,
                         fix=f"e.g. {option} 1,64,256")
    return values


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _render(report: dict) -> None:
    from sparsekit.exporters.speed import MIN_SPEEDUP, describe_slow

    console = make_console()
    run = report["run"]
    if run.get("method"):
        console.print(f"[bold]{report['path']}[/bold]: method {run['method']}, target sparsity "
                      f"{run.get('target_sparsity')}, realised {run.get('realized_sparsity'):.4f}, granularity "
                      f"{run.get('granularity', 'unstructured')}"
                      if isinstance(run.get("realized_sparsity"), float) else f"[bold]{report['path']}[/bold]")
    t = Table(title="layers (recomputed from the dense ONNX)")
    for col in ("layer", "shape", "nonzeros", "density", "MACs dense", "MACs sparse"):
        t.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    for ly in report["layers"]:
        t.add_row(ly["name"], "×".join(map(str, ly["shape"])), f"{ly['nonzeros']:,}", f"{ly['density']:.3f}",
                  _si(ly["macs_dense"]), _si(ly["macs_sparse"]))
    tot = report["totals"]
    t.add_row("[bold]total[/bold]", "", f"{tot['weight_nonzeros']:,}", f"{tot['weight_density']:.3f}",
              _si(tot["macs_dense"]), _si(tot["macs_sparse"]))
    console.print(t)
    tf = report.get("training_flops")
    if tf and tf.get("training_flops_vs_dense") is not None:
        console.print(f"training FLOPs vs dense: {tf['training_flops_vs_dense']:.3f}×")
    a = Table(title=f"artifacts (dense ONNX {report['dense_onnx_bytes']:,} bytes)")
    for col in ("artifact", "bytes", "dense/size", "accuracy", "top-1 agree", "MACs executed"):
        a.add_column(col, justify="left" if col == "artifact" else "right")
    for art in report["artifacts"]:
        q = art["quality"]
        acc = q.get("accuracy")
        a.add_row(art["artifact"], f"{art['bytes']:,}", f"{art['compression_vs_dense']:.2f}×",
                  f"{acc:.2%}" if isinstance(acc, float) else str(acc),
                  f"{q['top1_agreement']:.2%}" if "top1_agreement" in q else "-",
                  _si(art["macs_executed"]) if "macs_executed" in art else "-")
    console.print(a)
    for art in report["artifacts"]:
        g = art.get("structured_layouts") or {}
        if g.get("structured_layouts"):
            new, old = g["structured_bytes"], g["structured_unstructured_bytes"]
            console.print(f"{art['artifact']}: {g['structured_layouts']} of {len(g['layouts'])} sparse tensors in "
                          f"structured layouts, {new:,} bytes vs {old:,} unstructured "
                          f"({old / max(new, 1):.2f}× smaller)")
    if report["latency"]:
        lt = Table(title="ONNX Runtime CPU latency (interleaved, same run)")
        for col in ("artifact", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "speedup"):
            lt.add_column(col, justify="left" if col == "artifact" else "right")
        slow = {(a["artifact"], s["batch_size"], s["threads"]) for a in report["artifacts"]
                for s in a.get("slower_than_dense") or []}
        for r in report["latency"]:
            speedup = r.get("speedup_vs_dense")
            cell = f"{speedup:.2f}×" if speedup else "-"
            if (r["artifact"], r["batch_size"], r["threads"]) in slow:
                cell = f"[yellow]{cell} ⚠[/yellow]"
            lt.add_row(r["artifact"], str(r["batch_size"]), str(r["threads"]), f"{r['p50_ms']:.3f}",
                       f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", cell)
        console.print(lt)
        for g in report.get("structured_speed") or []:
            console.print(f"fast vs the same model unstructured (same nonzero count, random positions): "
                          f"{g['speedup_vs_unstructured']:.2f}× at batch {g['batch_size']}, {g['threads']} thread(s) "
                          f"({g['fast_p50_ms']:.3f} vs {g['unstructured_p50_ms']:.3f} ms)")
        for art in report["artifacts"]:
            if art.get("slower_than_dense"):
                console.print(f"[yellow]⚠ {art['artifact']} is slower than the dense model: "
                              f"{describe_slow(art['slower_than_dense'])} (speed formats below {MIN_SPEEDUP}×; "
                              f"gate: --min-speedup-each)[/yellow]")
    for art in report["artifacts"]:
        if art.get("note"):
            console.print(f"[dim]{art['artifact']}: {art['note']}[/dim]")
    for g in report["gates"]:
        mark = "[green]pass[/green]" if g["passed"] else "[red]FAIL[/red]"
        console.print(f"gate {g['gate']}: {mark} (value {g['value']}, threshold {g['threshold']}; {g['detail']})")


@app.command("report")
def report_cmd(
    path: Path = typer.Argument(..., help="A run dir (uses RUN_DIR/export, exporting what is missing), an "
                                "ONNX file or a .skz archive."),
    json_out: bool = typer.Option(False, "--json", help="Print the versioned JSON report.", show_default="off"),
    batch_sizes: str = typer.Option("1,64,256", "--batch-sizes", help="Comma-separated batch sizes to time."),
    threads: str = typer.Option("1", "--threads", help="Comma-separated intra-op thread counts."),
    runs: int = typer.Option(50, "--runs", min=1, help="Timed interleaved rounds per batch size."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed warm-up runs per artifact."),
    no_latency: bool = typer.Option(False, "--no-latency", help="Skip latency measurement.", show_default="off"),
    min_accuracy: float = typer.Option(None, "--min-accuracy",
                                       help="Gate: every artifact's accuracy ≥ X (fraction, or percent if > 1).", show_default="no gate"),
    min_speedup: float = typer.Option(None, "--min-speedup",
                                      help="Gate: the fastest artifact's p50 speedup vs dense ≥ X at every batch "
                                           "size and thread count.", show_default="no gate"),
    min_speedup_each: float = typer.Option(None, "--min-speedup-each",
                                           help="Gate: every speed artifact's (fast, compact-onnx, int8-onnx) p50 "
                                                "speedup vs dense ≥ X at every batch size and thread count "
                                                "(0.95: none slower than dense).", show_default="no gate"),
    max_size_ratio: float = typer.Option(None, "--max-size-ratio",
                                         help="Gate: smallest artifact bytes / dense ONNX bytes ≤ X.", show_default="no gate"),
    quiet: bool = quiet_option("Print nothing but errors (a failed gate still exits 3 with its line) and --json."),
) -> None:
    """Report parameters, nonzeros, MACs, file sizes, accuracy and CPU latency vs the dense model.

    Gates exit with code 3 when not met; a speed gate with --no-latency is a usage error (exit 2). Speed
    artifacts measured below 0.95× of dense are flagged in the latency table and the JSON
    (slower_than_dense), whatever the gates.

    Example: sparsekit report runs/demo --batch-sizes 1,256 --min-accuracy 0.9 --max-size-ratio 0.2 --json
    """
    from sparsekit.exporters.report import build_report, check_gates, raise_on_failed_gates, require_latency

    bs, th = _ints(batch_sizes, "--batch-sizes"), _ints(threads, "--threads")
    require_latency({"min_speedup": min_speedup, "min_speedup_each": min_speedup_each}, not no_latency)
    console = make_console(stderr=True, quiet=json_out or quiet)
    with console.status("reporting") as status:
        report = build_report(path, batch_sizes=bs, threads=th, runs=runs, warmup=warmup,
                              latency=not no_latency, progress=lambda what: status.update(what))
    check_gates(report, min_accuracy=min_accuracy, min_speedup=min_speedup, max_size_ratio=max_size_ratio,
                min_speedup_each=min_speedup_each)
    failed = any(not g["passed"] for g in report["gates"])
    if json_out and not failed:
        print(json.dumps(report, indent=2))
    elif not json_out and not quiet:
        _render(report)
    raise_on_failed_gates(report)  # with --json, the error object printed by main carries the report
