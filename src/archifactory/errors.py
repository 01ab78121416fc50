"""Errors a user can cause and fix, as opposed to bugs.

Every exception the library raises for bad input derives from :class:`UserError` (and from the built-in
type callers may already catch: ``ValueError``, ``KeyError``, ``RuntimeError``, ``ImportError``). The
command line prints such an error as one line and exits with status 2; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a config value, a file, a length, the setup); the message says what is
    wrong, where, and what to do."""


class InputError(UserError, ValueError):
    """A value, length or file content the user gave cannot be used (a corpus too short for one
    sequence, a prompt longer than the position table, a sampling parameter out of range)."""


class MissingFieldError(UserError, KeyError):
    """A record or table the user pointed to lacks a field it was told to read."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnavailableError(UserError, RuntimeError):
    """The setup lacks something the config asks for: a CUDA device for a kernel, a reachable hub."""


class ArchifactoryWarning(UserWarning):
    """Something the user should know that does not stop the command (a damaged cache entry rebuilt, a
    damaged metrics line skipped, generation past the trained context); the command line prints it as one
    ``warning: ...`` line, without Python's file:line prefix."""


class MissingDependencyError(UserError, ImportError):
    """An optional package the config needs is not installed; the message names the pip extra."""
