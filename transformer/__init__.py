"""The Annotated Transformer (harvardnlp), as a small, tested translation toolkit."""

__version__ = "0.1.0"
