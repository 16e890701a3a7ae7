"""The one exception type for bad input a user can fix (defined in models/errors.py, the bottom layer)."""
from models.errors import UserError

__all__ = ["UserError"]
