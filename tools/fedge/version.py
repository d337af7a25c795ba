"""The fedge release, in one place: ``fedge --version`` and the packaging read it."""

__version__ = "0.1.0"
