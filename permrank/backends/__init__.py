"""Backends: where windows are sent. Each is one file implementing ``Backend``."""

from .base import Backend
from .openai import OpenAIBackend

__all__ = ["Backend", "OpenAIBackend"]
