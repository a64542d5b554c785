"""User-facing errors: the CLI prints their message as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """A problem the user can fix (bad file, missing board, wrong port...)."""

    exit_code = 2
