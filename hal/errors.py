"""Typed errors of the project. Every user-facing failure is one of these, so a CLI can
print the one-line message and exit non-zero without a traceback."""
from __future__ import annotations


class HalError(Exception):
    """Base of every error the project raises on purpose (bad input, missing device, ...)."""


class DeviceUnavailable(HalError, RuntimeError):
    """The requested device cannot be used here; the message says why."""


class UnsupportedOpError(HalError, RuntimeError):
    """No implementation of an op supports the requested call; carries every rejection reason."""


class ConfigError(HalError, ValueError):
    """config.json (or generation_config.json) is missing, malformed or has a bad field."""


class CheckpointError(HalError, ValueError):
    """Weights are missing, extra, wrong-shaped, of a refused format (pickle) or unreadable."""


class InputError(HalError, ValueError):
    """Bad call-time input: prompt too long, bad token ids, bad sampling parameters."""


class NonFiniteError(HalError, RuntimeError):
    """A computation produced NaN or Inf (e.g. float16 overflow): the message names dtype and step."""


class DistributedError(HalError, RuntimeError):
    """A tensor-parallel rank failed, vanished or timed out: the message names the rank and why."""
