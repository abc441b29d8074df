"""Errors raised by the converters package (one root, named subclasses)."""

from __future__ import annotations


class ConverterError(Exception):
    """Root of converter errors."""


class KeyStoreError(ConverterError):
    """A signing key is missing, unreadable, or its passphrase is wrong."""


class PackError(ConverterError):
    """A bundle could not be packed from the given files."""
