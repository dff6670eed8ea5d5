"""A prototype for Findings: SendSms without the Aliyun SDK, to measure what the SDK costs.

`LeanAliyunProvider` signs the request itself (ACS3-HMAC-SHA256, the signature the SDK sends by
default and that tests/fake_aliyun.py verifies) and sends it over one keep-alive `http.client`
connection per worker thread. It implements the sidecar's Provider protocol (`send`; `find_sent` is
not prototyped) and returns the same SendResult values as sidecar/providers/aliyun.py for the cases
measured here. It is NOT the sidecar's code: bench/costs.py and bench/variants.py use it to put a
number on the proposed fix.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket
import ssl
import threading
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from sidecar.config import AliyunConfig
from sidecar.providers.aliyun import classify_business_error
from sidecar.providers.base import Outcome, SendResult, Sms, Timeouts

API_VERSION = "2017-05-25"


def _enc(value: str) -> str:
    return quote(value, safe="~")  # RFC 3986: only A-Z a-z 0-9 - _ . ~ stay literal


def signed_request(config: AliyunConfig, action: str, params: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The request target and headers of an ACS3-HMAC-SHA256 RPC call with `params` in the query."""
    query = "&".join(f"{k}={v}" for k, v in sorted((_enc(k), _enc(v)) for k, v in params.items()))
    empty_sha = hashlib.sha256(b"").hexdigest()
    headers = {
        "host": config.endpoint,
        "x-acs-action": action,
        "x-acs-content-sha256": empty_sha,
        "x-acs-date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "x-acs-signature-nonce": uuid.uuid4().hex,
        "x-acs-version": API_VERSION,
    }
    names = sorted(headers)
    canonical_headers = "".join(f"{n}:{headers[n].strip()}\n" for n in names)
    signed = ";".join(names)
    canonical = f"POST\n/\n{query}\n{canonical_headers}\n{signed}\n{empty_sha}"
    to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()
    signature = hmac.new(config.access_key_secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"ACS3-HMAC-SHA256 Credential={config.access_key_id},SignedHeaders={signed},Signature={signature}"
    )
    headers["accept"] = "application/json"
    headers["content-length"] = "0"
    return "/?" + query, headers


class LeanAliyunProvider:
    name = "aliyun"

    def __init__(self, config: AliyunConfig) -> None:
        self.config = config
        self._local = threading.local()
        self._tls = ssl.create_default_context() if config.protocol == "https" else None

    def warm_up(self) -> None:
        pass

    def _connection(self, timeouts: Timeouts) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            host, _, port = self.config.endpoint.partition(":")
            if self._tls is not None:
                conn = http.client.HTTPSConnection(host, int(port or 443), context=self._tls)
            else:
                conn = http.client.HTTPConnection(host, int(port or 80))
            self._local.conn = conn
        conn.timeout = timeouts.connect_ms / 1000
        return conn

    def send(self, sms: Sms, timeouts: Timeouts) -> SendResult:
        sign_name = sms.sign_name or self.config.sign_name
        template = sms.template_code or self.config.template_code
        phone = sms.phone[2:] if sms.phone.startswith("86") else sms.phone
        params = {
            "PhoneNumbers": phone,
            "SignName": sign_name,
            "TemplateCode": template,
            "TemplateParam": json.dumps({self.config.template_param: sms.code}),
            "OutId": sms.out_id,
        }
        target, headers = signed_request(self.config, "SendSms", params)
        conn = self._connection(timeouts)
        try:
            if conn.sock is None:
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock.settimeout(timeouts.read_ms / 1000)
            conn.request("POST", target, headers=headers)
            response = conn.getresponse()
            body: Any = json.loads(response.read() or b"{}")
        except (ConnectionRefusedError, socket.gaierror) as exc:
            self._local.conn = None
            conn.close()
            return SendResult(Outcome.RETRY, "ConnectFailed", repr(exc)[:300], status=503, connect_failure=True)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self._local.conn = None
            conn.close()
            return SendResult(Outcome.AMBIGUOUS, "NoResponse", repr(exc)[:300], status=504)
        code, message = str(body.get("Code", "")), str(body.get("Message", ""))
        request_id = body.get("RequestId") or None
        if response.status == 200 and code == "OK":
            return SendResult(Outcome.ACCEPTED, code, message, biz_id=body.get("BizId"), request_id=request_id)
        if response.status == 200:
            result = classify_business_error(code or "EmptyResponse", message)
            return SendResult(**{**result.__dict__, "request_id": request_id})
        outcome = Outcome.RETRY if response.status >= 500 or code.startswith("Throttling") else Outcome.REJECTED
        return SendResult(outcome, code or f"HTTP{response.status}", message, request_id=request_id, status=502)

    def find_sent(self, phone: str, out_ids: list[str], since: datetime) -> SendResult | None:
        raise NotImplementedError("not prototyped")
