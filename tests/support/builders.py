"""Builders for test inputs: phone numbers and ids no other test uses, and settings that step aside."""

from __future__ import annotations

import random
from typing import Any

import pytest


def without_send_limits(settings: Any, **extra: Any) -> None:
    """Many codes to few numbers from one test process: the sending limits are tested on purpose elsewhere."""
    settings(resend_cooldown_seconds=None, hourly_limit_per_phone=None, daily_limit_per_phone=None,
             others_hourly_limit_per_phone=None, others_daily_limit_per_phone=None, hourly_limit_per_user=None,
             hourly_limit_per_ip=None, **extra)  # fmt: skip


def fresh_phone() -> str:
    """A mainland mobile number no other test uses, in E.164 digits."""
    return "861" + random.choice("3456789") + f"{random.randrange(10**9):09d}"


@pytest.fixture
def phone() -> str:
    return fresh_phone()
