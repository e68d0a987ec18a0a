"""Errors that entry points turn into a one-line message and exit code 2."""


class InputError(ValueError):
    """A bad request from the user (unknown emotion, empty text, missing model ...); one line."""
