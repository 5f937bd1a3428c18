"""qlink's QMP client formats a message for the log only when the log takes it."""

from __future__ import annotations

import logging

import pytest
from qemu.qmp.message import Message

from qlink.runtime.qmp import _Client


class CountingMessage(Message):
    formatted = 0

    def __str__(self) -> str:
        CountingMessage.formatted += 1
        return super().__str__()


def test_no_message_is_formatted_unless_debug_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    client = _Client("vm1")
    greeting = CountingMessage({"QMP": {"version": {}, "capabilities": ["oob"]}})
    CountingMessage.formatted = 0
    with caplog.at_level(logging.INFO, logger=client.logger.name):
        assert client._cb_inbound(greeting) is greeting
        assert client._cb_outbound(greeting) is greeting
    assert CountingMessage.formatted == 0

    with caplog.at_level(logging.DEBUG, logger=client.logger.name):
        client._cb_inbound(greeting)
        client._cb_outbound(greeting)
    assert CountingMessage.formatted == 2
    assert [record.getMessage().split()[0] for record in caplog.records] == ["<--", "-->"]
