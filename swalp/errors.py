"""The errors a user can cause, and how their messages are cut to one line."""


class UserError(Exception):
    """A problem the user can fix (path, flag, data, checkpoint); train.py
    prints its message as one line and exits with code 2."""


def first_line(error):
    """The first line of an exception's message, or its type when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
