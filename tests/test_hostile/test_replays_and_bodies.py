"""Hostile input: replays, retired secrets, oversized and slow bodies."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from sidecar.hook import MAX_BODY_BYTES
from tests.support.builders import fresh_phone
from tests.support.fake_aliyun import FakeAliyun
from tests.support.gotrue import (
    GoTrueHookCaller,
    go_json,
    otp_login,
)
from tests.support.hostile import HOOK, NEW, OLD, RETIRED, SECRET, InProcess, answer_kind, signed

# --------------------------------------------------------------------------------------------------
# Replays, retired secrets, oversized and slow bodies


@pytest.mark.parametrize("version", [NEW, OLD], ids=["metadata", "no-metadata"])
def test_a_body_re_signed_under_new_ids_sends_one_sms(
    hook: InProcess, fake: FakeAliyun, version: tuple[int, int, int]
) -> None:
    body = go_json(otp_login(version, phone=fresh_phone()))
    answers = [hook.post(body, signed(body, timestamp=int(time.time()) - skew)) for skew in (0, 5, 120, 290, 0)]
    assert [(a.status_code, a.json()) for a in answers] == [(200, {})] * 5
    assert len(fake.sends) == 1


def test_a_replay_six_minutes_later_is_refused(hook: InProcess, fake: FakeAliyun) -> None:
    body = go_json(otp_login(NEW, phone=fresh_phone()))
    headers = signed(body)
    assert hook.post(body, headers).json() == {}
    assert hook.post(body, headers).json() == {}  # within the window: the same event, not sent again
    # The same request as captured six minutes ago (the verifier reads the wall clock itself).
    captured = signed(body, timestamp=int(time.time()) - 360)
    replay = hook.post(body, captured)
    assert replay.status_code == 401 and answer_kind(replay) == "error"
    # Nor does a fresh body with a stolen old signature pass, under a current timestamp.
    other = go_json(otp_login(NEW, phone=fresh_phone()))
    assert hook.post(other, {**captured, "webhook-timestamp": str(int(time.time()))}).status_code == 401
    assert len(fake.sends) == 1


def test_a_rotated_out_secret_is_refused(hook: InProcess, fake: FakeAliyun) -> None:
    result = hook.gotrue(otp_login(NEW, phone=fresh_phone()), secrets=RETIRED)
    assert [a.status for a in result.attempts] == [401] and result.outcome != "success"
    body = go_json(otp_login(OLD, phone=fresh_phone()))
    assert hook.post(body, signed(body, secret=RETIRED)).status_code == 401
    assert fake.requests_seen == 0
    # During a rotation GoTrue signs with both; the current one is enough.
    assert hook.gotrue(otp_login(NEW, phone=fresh_phone()), secrets=f"{RETIRED}|{SECRET}").outcome == "success"
    assert len(fake.sends) == 1


def test_oversized_bodies_are_refused_before_anything_is_sent(hook: InProcess, fake: FakeAliyun) -> None:
    payload = otp_login(NEW, phone=fresh_phone())
    payload["user"]["user_metadata"] = {"pad": "x" * MAX_BODY_BYTES}
    big = go_json(payload)
    assert hook.post(big, signed(big)).status_code == 413  # signed by GoTrue, still too big

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(20):
            yield b" " * 8192

    assert hook.post(chunks(), signed(b" " * 8192 * 20)).status_code == 413
    small = go_json(otp_login(NEW, phone=fresh_phone()))
    lying = [(k.encode(), v.encode()) for k, v in signed(small).items()] + [(b"content-length", b"99999999999")]
    assert hook.post(small, lying).status_code == 413
    assert fake.requests_seen == 0


def raw_exchange(url: str, head: bytes, body: bytes = b"", timeout: float = 10) -> tuple[int | None, bytes, float]:
    """Send bytes on a fresh connection; the status (None if closed without one), the reply and the time."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        data = b""
        try:
            sock.sendall(head + body)  # the server may answer and close before it has read everything
        except OSError:
            pass
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    elapsed = time.monotonic() - started
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(match[1]) if match else None), data, elapsed


def test_malformed_http_is_refused_and_the_server_stays_up(served: str, fake: FakeAliyun) -> None:
    body = go_json(otp_login(OLD, phone=fresh_phone()))
    good = "".join(f"{k}: {v}\r\n" for k, v in signed(body).items()).encode()
    heads = [
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nwebhook-id: a\x00b\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nX-Big: " + b"A" * 100_000 + b"\r\n" + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 5000 + good + b"\r\n",
        b"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n"
        + good + b"\r\nffffffffffffffffff\r\n",
    ]  # fmt: skip
    for head in heads:
        status, reply, elapsed = raw_exchange(served, head)
        assert status is None or 400 <= status < 500, reply[:200]
        assert elapsed < 5
    assert httpx.get(served + "/healthz", timeout=5).status_code == 200
    assert fake.requests_seen == 0


def test_slow_loris_bodies_are_cut_off_and_others_are_served(served: str, fake: FakeAliyun) -> None:
    declared = 60_000  # under the size limit, so only the time limit can stop it
    intended = b'{"pad": "' + b"x" * (declared - 11) + b'"}'
    assert len(intended) == declared
    results: list[tuple[int | None, float, int]] = []
    host, port = served.removeprefix("http://").split(":")

    def trickle() -> None:
        headers = "".join(f"{k}: {v}\r\n" for k, v in signed(intended).items())
        head = f"POST /hooks/send-sms HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n{headers}\r\n".encode()
        started = time.monotonic()
        sent, reply = 0, b""
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head)
            sock.settimeout(0.25)
            while time.monotonic() - started < 15:
                try:
                    sock.sendall(intended[sent : sent + 1])
                    sent += 1
                except OSError:
                    break
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                reply += chunk
                if not chunk or b"\r\n\r\n" in reply:
                    break
        match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
        results.append((int(match[1]) if match else None, time.monotonic() - started, sent))

    lorises = [threading.Thread(target=trickle) for _ in range(12)]
    for t in lorises:
        t.start()
    time.sleep(0.5)
    # Meanwhile, everyone else is served promptly, GoTrue included.
    started = time.monotonic()
    assert httpx.get(served + "/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < 1
    phone = fresh_phone()
    started = time.monotonic()
    result = GoTrueHookCaller(served + HOOK, SECRET, version=NEW).call(otp_login(NEW, phone=phone))
    assert result.outcome == "success" and time.monotonic() - started < 3
    for t in lorises:
        t.join(20)
    assert len(results) == 12
    for status, elapsed, sent in results:
        assert status in (408, None), results  # answered with the slow-body error, or cut off
        assert elapsed < 4, results
        assert sent < declared
    assert [s.phone_numbers for s in fake.sends] == [phone[2:]]
