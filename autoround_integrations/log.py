"""The project's one logger, ``autoround``; its level follows ``AR_LOG_LEVEL``."""

from __future__ import annotations

import logging

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

logger = logging.getLogger("autoround")


def apply_level() -> None:
    from . import envs

    level = envs.AR_LOG_LEVEL
    logger.setLevel(TRACE if level == "TRACE" else getattr(logging, level))


def _setup() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s autoround: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    apply_level()


_setup()
