"""The one exception type that the stage scripts turn into a message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment: its text is a one-paragraph message saying what to do."""
