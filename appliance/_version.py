"""The package version: setup.py reads it from here, ``appliance.__version__`` re-exports it."""
__version__ = "0.1.0"
