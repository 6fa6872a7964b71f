"""Exporters (installed as ``sparsekit.exporters``): registered writers and validators.

Each format is a small module that registers a writer with ``@register_format``; ``FORMATS`` maps
format names to writers, and ``sparsekit export --list`` prints it.
"""

from sparsekit.exporters.registry import FORMATS, ExportFormat, get_format, register_format

__all__ = ["FORMATS", "ExportFormat", "get_format", "register_format"]
