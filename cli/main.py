"""Entry point of the ``sparsekit`` command.

Commands live in one module each (``sparsekit.cli.<name>``) and register themselves on ``app``.
``main()`` turns every ``SparsekitError`` into one line on stderr (plus a JSON object on stdout
with ``--json``) and the documented exit code; unexpected exceptions exit 1 with one line too
(set ``SPARSEKIT_DEBUG=1`` to see the traceback).
"""

from __future__ import annotations

import json
import os
import sys

import typer
from typer.exceptions import Abort, Exit, TyperException

from sparsekit.errors import EXIT_INTERNAL, EXIT_USAGE, SparsekitError

app = typer.Typer(
    name="sparsekit",
    help=(
        "Train neural networks sparse from scratch (RigL and the baselines of the RigL paper), export "
        "them to sparse-aware ONNX and compressed formats, and report parameter, FLOP, size and CPU "
        "latency savings.\n\nExample: sparsekit train --method rigl && sparsekit export runs/latest "
        "&& sparsekit report runs/latest"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _register() -> None:
    # Import for side effects: each module adds its commands to ``app``.
    import importlib

    for name in ("train", "registry_cmds", "export", "report", "run", "compare", "viz"):
        try:
            importlib.import_module(f"sparsekit.cli.{name}")
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name != f"sparsekit.cli.{name}":
                raise


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv


def _emit_error(message: str, payload: dict, json_mode: bool) -> None:
    print(f"error: {message}", file=sys.stderr)
    if json_mode:
        print(json.dumps(payload))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with the documented code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _register()
    json_mode = _wants_json(argv)
    try:
        code = app(args=argv, prog_name="sparsekit", standalone_mode=False)
    except SparsekitError as exc:
        _emit_error(exc.message, exc.to_json(), json_mode)
        sys.exit(exc.exit_code)
    except Exit as exc:
        sys.exit(exc.exit_code)
    except Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except TyperException as exc:  # usage errors from the command-line parser
        msg = exc.format_message().replace("\n", " ")
        ctx = getattr(exc, "ctx", None)
        hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        payload = {"error": {"type": "usage", "message": msg + hint}, "exit_code": EXIT_USAGE}
        _emit_error(msg + hint, payload, json_mode)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # pragma: no cover - last resort, still one line
        if os.environ.get("SPARSEKIT_DEBUG"):
            raise
        msg = f"internal error: {type(exc).__name__}: {exc}".replace("\n", " ")
        _emit_error(msg + " (set SPARSEKIT_DEBUG=1 for a traceback; please report it)",
                    {"error": {"type": "internal", "message": msg}, "exit_code": EXIT_INTERNAL}, json_mode)
        sys.exit(EXIT_INTERNAL)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
