"""The one exception type that the stage scripts turn into a message instead of a traceback."""
import textwrap


class UserError(Exception):
    """Bad input or environment: its text is a one-paragraph message saying what to do."""


def error_paragraph(e: BaseException) -> str:
    """The one-paragraph message every command-line entry point prints for a UserError."""
    return textwrap.fill(f"error: {e}", width=100)
