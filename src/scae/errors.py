"""Exceptions raised for problems the user can fix (bad input, unwritable output)."""


class ScaeInputError(ValueError):
    """Input that scae cannot use: the message names the problem and what was expected.

    The command line prints the message as one line and exits with status 2.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line reports."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
