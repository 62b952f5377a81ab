"""The running build's version, from the installed distribution's metadata (pyproject.toml is its one source)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("kubetriage")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"
