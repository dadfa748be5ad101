"""The one exception type the CLI turns into a single error line (no traceback)."""


class BinarizeError(Exception):
    """Bad input or an impossible request, explained in one line."""
