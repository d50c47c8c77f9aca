"""Exceptions raised for problems the user can fix (bad input, unwritable output)."""


class ScaeInputError(ValueError):
    """Input that scae cannot use: the message names the problem and what was expected.

    The command line prints the message as one line and exits with status 2.
    """
