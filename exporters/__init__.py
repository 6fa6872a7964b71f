"""Exporters (installed as ``sparsekit.exporters``): registered writers and validators.

Each format is a small module that registers a writer with ``@register_format``; ``FORMATS`` maps
format names to writers, and ``sparsekit export --list`` prints it. A writer is called as
``write(ctx: ExportContext, out_path: Path, options: ExportOptions) -> dict`` (``precision``, ``notes``
and anything else worth reporting), writes ``out_path`` atomically, and the pipeline validates the file:
ONNX files through ONNX Runtime, other files through a runner registered with
``sparsekit.exporters.validate.register_runner(format)`` (``loader(path, threads) -> (x -> logits)``),
which ``sparsekit report`` also uses to time them.
"""

import importlib

from sparsekit.exporters.registry import FORMATS, ExportFormat, get_format, register_format

# Import order is the order of ``--list`` and of ``--format all``.
for _name in ("dense", "sparse_onnx", "compact", "compressed", "int8", "fast", "semi_structured"):
    try:
        importlib.import_module(f"sparsekit.exporters.{_name}")
    except ModuleNotFoundError as _exc:  # ``fast`` is optional until it lands
        if _exc.name != f"sparsekit.exporters.{_name}":
            raise

__all__ = ["FORMATS", "ExportFormat", "get_format", "register_format"]
