"""What every ``layerwise`` command shares: the parser class and the mapping of errors to exit codes.

* :class:`Parser` turns off prefix matching of long options (``--scal`` is not ``--scale``) on the root
  parser and, through argparse's ``parser_class``, on every subparser built from it; a usage error is one
  line on stderr and exit code 2.
* :func:`run_handler` runs a command's handler and maps what it raises:

  ==========================================  ===============================================  =========
  raised                                      printed on stderr                                exit code
  ==========================================  ===============================================  =========
  :class:`~layerwise.errors.LayerwiseError`   ``layerwise COMMAND: error: MESSAGE``            2
  ``ValueError`` / ``TypeError``              the same (callers predating the hierarchy)      2
  ``OSError`` (missing file, folder, rights)  the same, naming the path                        2
  ``MemoryError``                             the same, asking for smaller sizes               2
  ``KeyboardInterrupt``                       ``layerwise COMMAND: interrupted``               130
  anything else (a bug)                       its traceback and a line asking to report it     1
  ==========================================  ===============================================  =========

  With ``LAYERWISE_DEBUG=1`` in the environment every error propagates with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["Parser", "debug_enabled", "one_line", "run_handler"]


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``allow_abbrev=False`` always, and one-line usage errors.

    ``add_subparsers`` builds subparsers of the parser's own class, so every parser of the command tree is
    a ``Parser`` whatever the subcommand module passes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def debug_enabled() -> bool:
    """True when ``LAYERWISE_DEBUG`` is set to anything but ``""`` or ``"0"``."""
    return os.environ.get("LAYERWISE_DEBUG", "") not in ("", "0")


def one_line(text: str) -> str:
    """``text`` with its lines joined by ``"; "`` (an error message stays one line on the terminal)."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return "; ".join(parts) if parts else str(text).strip()


def _os_message(err: OSError) -> str:
    """``strerror: 'path'`` for errors on a path (``[Errno 21] Is a directory: 'x'`` becomes readable)."""
    if err.filename is None or err.strerror is None:
        return str(err)
    target = f"{err.filename!r}" + (f" -> {err.filename2!r}" if err.filename2 is not None else "")
    return f"{err.strerror}: {target}"


def _message(err: BaseException) -> str:
    from ..errors import LayerwiseError

    if isinstance(err, LayerwiseError):
        return str(err)
    if isinstance(err, OSError):
        return _os_message(err)
    if isinstance(err, MemoryError):
        return f"out of memory ({err or 'allocation failed'}); reduce the sizes of the request"
    return str(err) or type(err).__name__


# Errors caused by the user's input or machine: one line, exit 2. Everything else is a bug.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, MemoryError)


def run_handler(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace, command: str) -> int:
    """Run ``func(args)`` and turn what it raises into a message and an exit code (see the module doc)."""
    from ..errors import LayerwiseError

    prefix = f"layerwise {command}"
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except (LayerwiseError, *_USER_ERRORS) as err:
        if debug_enabled():
            raise
        print(f"{prefix}: error: {one_line(_message(err))}", file=sys.stderr)
        return 2
    except Exception:  # a bug: keep it visible
        if debug_enabled():
            raise
        traceback.print_exc()
        print(
            f"{prefix}: internal error (a bug in layerwise, not in your input); please report it with the "
            "command line and the traceback above",
            file=sys.stderr,
        )
        return 1
