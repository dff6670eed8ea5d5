"""Prometheus metrics, in a registry per app so several apps (tests) never clash."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
_RECEIPT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.hook_requests = Counter("sms_hook_requests", "Send SMS hook requests by outcome.", ["outcome"], registry=r)
        self.hook_rejections = Counter(
            "sms_hook_rejections", "Hook requests refused before sending, by reason.", ["reason"], registry=r
        )
        self.hook_latency = Histogram(
            "sms_hook_duration_seconds", "Time to answer a hook request.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.provider_latency = Histogram(
            "sms_provider_duration_seconds", "Provider send latency.", ["provider"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.provider_results = Counter(
            "sms_provider_results", "Provider results by code.", ["provider", "code"], registry=r
        )
        self.queue_depth = Gauge("sms_outbox_queued", "Messages waiting in sms.outbox.", registry=r)
        self.queue_oldest = Gauge("sms_outbox_oldest_queued_seconds", "Age of the oldest queued message.", registry=r)
        self.delivery_latency = Histogram(
            "sms_delivery_latency_seconds", "From enqueue to accepted by the provider.", buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.delivery_retries = Counter(
            "sms_delivery_retries", "Outbox deliveries scheduled again, by provider code.", ["code"], registry=r
        )
        self.delivery_failures = Counter(
            "sms_delivery_failures", "Outbox messages given up, by provider code.", ["code"], registry=r
        )
        # Delivery receipts (sidecar/receipts.py, sidecar/receipt_poll.py).
        self.receipt_pushes = Counter(
            "sms_receipt_pushes", "Aliyun receipt pushes by answer (stored, invalid, too_large, not_stored).",
            ["result"], registry=r,
        )  # fmt: skip
        self.receipts = Counter(
            "sms_receipts", "Delivery receipts by result (delivered, undelivered, repeated, unknown) and carrier code.",
            ["result", "code"], registry=r,
        )  # fmt: skip
        self.receipt_latency = Histogram(
            "sms_receipt_latency_seconds", "From Aliyun sending an SMS to the carrier's receipt, by result.",
            ["result"], buckets=_RECEIPT_BUCKETS, registry=r,
        )  # fmt: skip
        self.receipt_polls = Counter(
            "sms_receipt_polls", "QuerySendDetails asked for a missing receipt, by answer (receipt, pending, error).",
            ["result"], registry=r,
        )  # fmt: skip
        self.receipt_window_sent = Gauge(
            "sms_receipt_window_sent", "SMS accepted 10 to 40 minutes ago (the window of sms_delivered_within_ratio).",
            registry=r,
        )  # fmt: skip
        self.delivered_within = Gauge(
            "sms_delivered_within_ratio",
            "Share of the SMS accepted 10 to 40 minutes ago that the carrier reported delivered within N minutes.",
            ["minutes"], registry=r,
        )  # fmt: skip
        self.undelivered = Gauge(
            "sms_undelivered_ratio", "Share of the SMS accepted 10 to 40 minutes ago that the carrier did not deliver.",
            registry=r,
        )  # fmt: skip
