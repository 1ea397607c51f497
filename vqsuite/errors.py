"""The exceptions vqsuite raises on purpose, and what each one means for whoever called it.

A :class:`UserError` means *the input is wrong* (a bad config value, a corrupt or hostile checkpoint, an
impossible sweep declaration): its message is one readable line written for the user, and the CLI prints it with
exit code 2. Anything else that escapes the library is a bug, reported by the CLI as "internal error, please
report". User errors subclass ``ValueError`` so ``except ValueError`` keeps working for library callers.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserError"]


class UserError(ValueError):
    """The caller's input is wrong; the message is one readable line naming what and why."""


class ConfigError(UserError):
    """A quantization config, spec, preset or option that cannot be used (names the field and value)."""
