"""The ``sparsekit`` command line (installed as ``sparsekit.cli``): a thin Typer shell over the library."""
