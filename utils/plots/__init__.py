"""Stage 5's figures, one module per family (style.py holds what they share)."""
