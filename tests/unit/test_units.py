"""Byte units: one decimal family (GB = 10^9, MB = 10^6) for every setting, estimate and report."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.coordinator.handlers import bad_image
from services.gateway.state import Gateway
from shared.config.schema import parse_config
from shared.config.units import GB, MB, format_gb, parse_size
from shared.wire.messages import ChatRequest
from tests.stackproc import fake_config


def test_parse_size_reads_decimal_and_binary_units() -> None:
    assert parse_size("47GB") == 47 * 10**9
    assert parse_size("44GiB") == 44 * 2**30
    assert parse_size("1500 MB") == 1500 * 10**6
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read"):
        parse_size("lots")


def test_sizes_read_in_gigabytes_of_ten_to_the_nine() -> None:
    assert format_gb(12_345_000_000) == "12.3 GB"
    assert format_gb(GB // 2, 2) == "0.50 GB"


def test_megabyte_settings_are_decimal_like_gigabyte_ones(tmp_path: Path) -> None:
    """max_message_mb = 2 takes 2,000,000 bytes, not 2,097,152: every `*_mb` is 10^6 bytes as every `*_gb` is 10^9."""
    runtime = {"max_message_mb": 2.0, "client_queue_mb": 10.0, "max_image_mb": 1.0}
    raw = fake_config(tmp_path)
    config = parse_config({**raw, "runtime": {**raw["runtime"], **runtime}})
    assert config.max_message_bytes() == 2 * MB
    assert config.client_queue_frames() == 5
    assert bad_image(config, ChatRequest(text="x", image=b"\x00" * (MB + 1))).code == "image_too_large"
    # the gateway's body limit leaves room for that image in base64 (4/3 as many bytes) and the JSON around it
    assert Gateway(config).max_body_bytes == int(MB * 4 / 3) + MB
