"""condery: a container registry that builds conda images on demand."""

__version__ = "0.1.0"
