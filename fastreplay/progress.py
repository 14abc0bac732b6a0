"""Progress bars and logging set-up shared by every command (rich on a terminal, quiet in tests)."""
from __future__ import annotations

import logging
import sys
import contextlib
from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .exceptions import ConfigError

log = logging.getLogger("fastreplay")
_console = Console(stderr=True)
_enabled = sys.stderr.isatty()
_live: Optional[Progress] = None


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str = "INFO", log_file: Optional[str] = None,
                  progress: Optional[bool] = None) -> None:
    """Log to stderr (rich) and, with ``log_file``, to that file too. Checked first, so a bad
    --log-level or --log-file is a one-line ConfigError before any work starts."""
    global _enabled
    if level.upper() not in LEVELS:
        raise ConfigError(f"--log-level {level!r}: use {', '.join(LEVELS[:-1])} or {LEVELS[-1]}")
    if progress is not None:
        _enabled = progress
    handlers: list[logging.Handler] = [RichHandler(console=_console, show_path=False)]
    _LogFile.failure = None
    if log_file:
        handlers.append(_file_handler(log_file))
    for old in log.handlers:
        with contextlib.suppress(OSError, ValueError):  # a log file whose writes failed
            old.close()
    log.handlers[:] = handlers
    log.setLevel(level.upper())
    log.propagate = False


class _LogFile(logging.FileHandler):
    """A FileHandler that remembers its first failed write (a full disk, /dev/full) instead of
    printing a traceback per record and letting the command end with 0: the log the user asked
    for is incomplete, which main() reports (log_file_failure) with a non-zero exit."""

    failure: Optional[str] = None

    def handleError(self, record) -> None:
        exc = sys.exc_info()[1]
        if _LogFile.failure is None:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            _LogFile.failure = (f"--log-file {self.baseFilename}: writing the log failed "
                                f"({reason}); the log is incomplete: free space or choose "
                                "another path, then rerun")


def _file_handler(log_file) -> logging.Handler:
    """The --log-file handler, tried with a first line (the command being run) so that a file
    that can be opened but not written (/dev/full, a full disk) is refused before any work."""
    try:
        fh = _LogFile(log_file)
    except OSError as exc:
        raise ConfigError(f"--log-file {log_file}: cannot open it ({exc.strerror or exc}); create "
                          "its directory or choose another path") from None
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        fh.stream.write(f"# fastreplay {' '.join(sys.argv[1:])}\n")
        fh.flush()
    except OSError as exc:
        with contextlib.suppress(OSError):
            fh.close()
        raise ConfigError(f"--log-file {log_file}: cannot write to it ({exc.strerror or exc}); "
                          "choose another path") from None
    return fh


def log_file_failure() -> Optional[str]:
    """Why writing the --log-file failed after it was opened (None: it did not)."""
    return _LogFile.failure


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """Yields ``advance(n=1)``; draws a bar only on an interactive terminal.

    Nested bars (a rebuild inside a replay) join the outer display as an extra, transient row.
    """
    global _live
    if not _enabled:
        yield lambda n=1: None
        return
    if _live is not None:
        task = _live.add_task(description, total=total)
        try:
            yield lambda n=1: _live.advance(task, n)
        finally:
            _live.remove_task(task)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=_console,
                  transient=False) as bar:
        _live = bar
        try:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)
        finally:
            _live = None
