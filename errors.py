"""The project's one base exception.  Dependency-free and Python 3.6-clean, so every package (the solvers, the
device side, config) can share it without importing configuration code."""


class UserError(Exception):
    """Bad input from the user (a file, field, flag or value); step scripts print it and exit 2."""
