"""Keep DeepSpeed's routine warnings out of the user's output; its real warnings and errors still show."""
from __future__ import annotations

import logging

__all__ = ["NOISE", "silence_deepspeed_noise"]

# Printed on every CPU run and at the first step of every run: neither says anything the user can act on.
NOISE = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(noise) for noise in NOISE)


def silence_deepspeed_noise() -> None:
    """Filter the NOISE messages from DeepSpeed's logger; call before deepspeed is imported (idempotent).
    The logger is looked up by name, so the filter holds once DeepSpeed configures it on import."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())
