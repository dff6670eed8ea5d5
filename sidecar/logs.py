"""JSON logs on stdout. Phone numbers are masked; codes, secrets and signatures are never logged."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "configure", "mask_phone", "silence_sdk_logger"]

# ITU country codes of two digits; 1 and 7 are the one-digit ones, everything else has three.
_TWO_DIGIT = {
    "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45", "46", "47", "48", "49",
    "51", "52", "53", "54", "55", "56", "57", "58", "60", "61", "62", "63", "64", "65", "66", "81", "82", "84",
    "86", "90", "91", "92", "93", "94", "95", "98",
}  # fmt: skip
# uvicorn adds color_message, an ANSI-coloured copy of the message.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message",
}  # fmt: skip


def mask_phone(phone: str | None) -> str:
    """`8613012341234` -> `+86*******1234`: enough to correlate, not enough to contact."""
    if not phone:
        return ""
    digits = "".join(ch for ch in phone if ch.isdigit())
    if len(digits) < 8:
        return "*" * len(digits)
    cc_len = 1 if digits[0] in "17" else 2 if digits[:2] in _TWO_DIGIT else 3
    return "+" + digits[:cc_len] + "*" * (len(digits) - cc_len - 4) + digits[-4:]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    silence_sdk_logger()


def silence_sdk_logger() -> None:
    """Keep the Aliyun SDK's transport out of the logs, whatever the log level.

    Its core logger prints request headers, Authorization included, when DEBUG=sdk, and urllib3 logs
    every request line at DEBUG, with the phone number and the code in the query string. The SDK
    sets its logger up again when imported, so this runs again after that import.
    """
    darabonba = logging.getLogger("darabonba-core")
    darabonba.handlers[:] = []
    darabonba.propagate = False
    darabonba.setLevel(logging.CRITICAL)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
