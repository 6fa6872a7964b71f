"""``sparsekit models | datasets | methods [NAME]``: list the registries (with --json)."""

from __future__ import annotations

import typer
from rich.table import Table
from sparsekit.cli.main import app
from sparsekit.cli.render import print_json, stdout_console


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


@app.command(epilog="Example: sparsekit models --json")
def models(json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.", show_default="off")) -> None:
    """List the built-in models with their defaults (``--model NAME``)."""
    from sparsekit.models import list_models

    items = list_models()
    if json_out:
        print_json(items)
        return
    rows = [[m["name"], m["description"], ", ".join(f"{k}={v}" for k, v in m.get("defaults", {}).items())]
            for m in items]
    stdout_console().print(_table("models (also: py:module:function, py:file.py:function)",
                                  ["name", "description", "defaults"], rows))


@app.command(epilog="Example: sparsekit datasets")
def datasets(json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.", show_default="off")) -> None:
    """List the dataset spec forms (``--data SPEC``)."""
    from sparsekit.data import list_datasets

    items = list_datasets()
    if json_out:
        print_json(items)
        return
    rows = [[d["name"], d["description"], d.get("example", "")] for d in items]
    stdout_console().print(_table("datasets", ["name", "description", "example"], rows))


@app.command(epilog="Examples: sparsekit methods ; sparsekit methods rigl ; sparsekit methods show rigl --json")
def methods(
    name: list[str] = typer.Argument(None, help="A method name (or 'show NAME') for its options and paper defaults."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.", show_default="off"),
) -> None:
    """List the sparse-training methods, or show one method's options and paper defaults."""
    from sparsekit.granularity import FORMS, method_granularities
    from sparsekit.methods import METHODS, get_method_class

    args = [n for n in (name or []) if n != "show"]
    if args:
        cls = get_method_class(args[0])
        info = {"name": cls.name, "family": cls.family, "description": cls.description,
                "reference": cls.reference, "options": dict(cls.defaults), "paper_recipe": dict(cls.paper_recipe),
                "granularities": method_granularities(cls)}
        if json_out:
            print_json(info)
            return
        rows = [[k, repr(v)] for k, v in cls.defaults.items()] or [["(none)", ""]]
        t = _table(f"{cls.name}: {cls.description}", ["option", "default"], rows)
        console = stdout_console()
        console.print(t)
        if cls.paper_recipe:
            console.print("paper recipe: " + ", ".join(f"{k}={v}" for k, v in cls.paper_recipe.items()))
        console.print("granularities (--granularity): " + ", ".join(info["granularities"]))
        if cls.reference:
            console.print(f"reference: {cls.reference}")
        return
    items = [{"name": c.name, "family": c.family, "description": c.description, "options": dict(c.defaults),
              "granularities": method_granularities(c)} for c in METHODS.values()]
    if json_out:
        print_json(items)
        return
    rows = [[m["name"], m["family"], m["description"],
             ", ".join(f"{k}={v}" for k, v in m["options"].items())] for m in items]
    console = stdout_console()
    console.print(_table("methods", ["name", "family", "description", "defaults"], rows))
    console.print(f"mask granularity of the sparse methods (--granularity): {FORMS}; see docs/methods.md#granularity")
    from sparsekit.config import list_presets

    presets = [[p["name"], p["description"], p["usage"]] for p in list_presets()]
    if presets:
        console.print(_table("presets (train/compare --config preset:NAME)", ["name", "recipe", "usage"], presets))
