"""Build script. The package is pure Python plus optional compiled extensions in csrc/ (added as they land);
metadata lives in pyproject.toml."""

from setuptools import setup

setup()
