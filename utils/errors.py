"""The one-paragraph form of a UserError (the exception itself lives in the quantization core)."""
import textwrap

from quant.errors import UserError

__all__ = ["UserError", "error_paragraph"]


def error_paragraph(e: BaseException) -> str:
    """The one-paragraph message every command-line entry point prints for a UserError."""
    return textwrap.fill(f"error: {e}", width=100, break_on_hyphens=False)
