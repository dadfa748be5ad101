"""The package version, in a module of its own so that every module can import it without
importing the package (no import cycle through ``binarize/__init__``)."""

__version__ = "0.1.0"
