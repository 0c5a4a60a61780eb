"""The version of mgd3 (one place; `mgd3.__version__` re-exports it)."""

__version__ = "0.1.0"
