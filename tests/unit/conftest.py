"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.telemetry.tracing import TRACING


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, every span exported to memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    TRACING.configure(enabled=True, span_exporter=exporter)
    try:
        yield exporter
    finally:
        TRACING.shutdown()
