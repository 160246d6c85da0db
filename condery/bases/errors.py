"""The one error of the base image side: callers answer it as UNAVAILABLE with its message."""


class BaseImageError(RuntimeError):
    """The base image cannot be used: bad spec, unreachable, or it failed verification."""


