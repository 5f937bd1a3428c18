"""Endpoints that stream until the client leaves or qlinkd stops: packet captures of a link
end (`GET /v1/captures/NODE:IF`, pcap) and the daemon's events (`GET /v1/events`, JSON lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web

from qlink.aio import first_of
from qlink.api.capture import capture
from qlink.api.consoles import CONSOLES, _daemon


async def capture_route(request: web.Request) -> web.StreamResponse:
    """`?seconds=S` stops after S seconds; otherwise it runs until the client hangs up."""
    packets = capture(_daemon(request), request.match_info["endpoint"])
    first = await anext(packets)  # the pcap header; errors before it are plain replies
    response = web.StreamResponse(headers={"Content-Type": "application/vnd.tcpdump.pcap"})
    await response.prepare(request)
    await response.write(first)
    seconds = float(request.query.get("seconds", 0)) or None
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                async for chunk in packets:
                    await response.write(chunk)
    finally:
        # Time is up, the client went away (the handler is cancelled) or QEMU did.
        await packets.aclose()
    await response.write_eof()
    return response


async def events_route(request: web.Request) -> web.StreamResponse:
    """Every event from now on (`?lab=NAME`: that lab's), one JSON object a line. The first
    line, `{"event": "subscribed"}`, says that nothing after it can be missed."""
    lab = request.query.get("lab")
    stopping = request.app[CONSOLES].stopping
    with _daemon(request).subscribe() as subscription:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(json.dumps({"event": "subscribed"}).encode() + b"\n")
        while True:
            index, next_event = await first_of(subscription.get(), stopping.wait())
            if index == 1:
                break  # qlinkd is stopping: end the stream properly
            event = next_event.result()
            if lab in (None, event.get("lab")) or event["event"] == "lagged":
                await response.write(json.dumps(event).encode() + b"\n")
            if event["event"] == "lagged":
                break
    await response.write_eof()
    return response
