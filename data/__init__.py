"""Data set preparation: `python -m data.prepare <command>` (see data/README.md)."""
