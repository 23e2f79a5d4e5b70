"""The project's one base exception.  Dependency-free and Python 3.6-clean, so every package (the solvers, the
device side, config) can share it without importing configuration code."""


class UserError(Exception):
    """Bad input from the user (a file, field, flag or value); step scripts print it and exit 2."""


def one_line(text, limit=600):
    # type: (str, int) -> str
    """`text` on one line (whitespace runs collapsed), at most `limit` characters: error messages of a library
    (torch's multi-line load errors, say) as the one line a step prints."""
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'
