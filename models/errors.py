"""The one exception type for bad input a user can fix. It lives at the bottom layer (models), so that every
layer above raises the same type; quant.errors and utils.errors re-export it."""


class UserError(Exception):
    """Bad input or environment: its text is a one-paragraph message saying what to do. The
    command-line entry points print it as one paragraph and exit with code 2, never a traceback."""
