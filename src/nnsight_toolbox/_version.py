"""The package's version, in a module of its own: the file format records it, and
importing it from the package's ``__init__`` would import every module of the package.

Examples:
    >>> from nnsight_toolbox._version import __version__
    >>> __version__.count(".")
    2
"""

__version__ = "0.1.0"
