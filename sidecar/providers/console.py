"""Development provider: prints the message instead of sending it.

It prints the code on purpose (that is what it is for) and on stderr, apart from the JSON logs,
which never carry codes. `sms-sidecar serve` refuses nothing here: SMS_PROVIDER=console is an
explicit choice.
"""

from __future__ import annotations

import sys
import uuid
from datetime import datetime

from sidecar.logs import mask_phone
from sidecar.outcomes import OK, Outcome, SendResult, stored_result
from sidecar.providers.base import Receipt, Sms

__all__ = ["ConsoleProvider"]


class ConsoleProvider:
    name = "console"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, sms: Sms, timeout: float) -> SendResult:
        print(f"[console SMS] to {mask_phone(sms.phone)} (out_id {sms.out_id}): code {sms.code}",
              file=sys.stderr, flush=True)  # fmt: skip
        return SendResult(Outcome.ACCEPTED, OK, "printed by the console provider", biz_id=f"console-{uuid.uuid4()}")

    async def find_sent(self, phone: str, out_ids: list[str], since: datetime, timeout: float) -> SendResult | None:
        return None  # printing never leaves a doubt about whether it happened

    async def query_receipt(self, phone: str, biz_id: str, sent_at: datetime, timeout: float) -> Receipt | None:
        return None  # no carrier, no receipt

    def classify(self, code: str, message: str) -> SendResult:
        return stored_result(code, message)
