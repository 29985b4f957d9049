"""`recursify` command line: a thin layer over the Python API.

`app.py` holds the typer app, the error type and the shared helpers; each module imported below
registers its commands on that app (their order is the order of `recursify --help`). A new
command group is a new module here plus its name in this import. An import error in any of them
is a bug and fails loudly: commands never disappear silently.
"""

from .app import CLIError, app, atomic_output_dir, dir_size, human_bytes, main
from . import compress, convert, evaluate, train, serve, exits, report  # noqa: F401  (importing registers; this order = help order)

__all__ = ["CLIError", "app", "atomic_output_dir", "dir_size", "human_bytes", "main"]
