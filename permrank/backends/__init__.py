"""Backends: where windows are sent. Each is one file implementing ``Backend``."""

from permrank.backends.base import Backend
from permrank.backends.openai import OpenAIBackend

__all__ = ["Backend", "OpenAIBackend"]
