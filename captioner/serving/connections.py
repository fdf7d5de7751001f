"""The server's connections: uvicorn's h11 protocol guarded against slow and numerous clients.

`build_server(app, limits, open_files)` gives a uvicorn.Server whose connections are watched
by one `ConnectionGuard` (`server.guard`). A connection must complete its request head within
`serve.header_timeout_s` of opening or of its previous response (else 408 and closed), idle
keep-alive connections close after `_KEEP_ALIVE_S`, a response sent before the request body
was read closes the connection, and at most `serve.max_connections` are open: at the cap the
longest-silent connection still waiting for its head is closed to make room (a slowloris
cannot lock others out); one not yet read from is spared (for a second at most), so a burst
of fresh connections may pass the cap by one accept batch, past which a new connection gets
503; the count is brought back to the cap as soon as they have been read. A malformed request
or a head over `_MAX_HEAD_BYTES` gets 400; every refusal is the one error shape.

`raise_open_file_limit()` raises the process's open-file limit to its hard limit first;
`connection_cap` fits the cap under it (less two accept batches, `accept_backlog`, and
`_FD_RESERVE`; CaptionerError when nothing is left). What the guard closes and refuses, and
failed accepts, are logged as one summary line per `_SUMMARY_INTERVAL_S`, never a line (or a
traceback) per connection. No WebSocket: an upgrade request is answered as plain HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import json
import logging
import os
import socket
import time
from http import HTTPStatus
from typing import Any

from captioner.config import ServeConfig
from captioner.errors import CaptionerError
from captioner.serving.schemas import error_body

log = logging.getLogger(__name__)

_KEEP_ALIVE_S = 5  # an idle keep-alive connection closes after this (uvicorn's default, said here)
_MAX_HEAD_BYTES = 16 * 1024  # a request line and headers longer than this are refused (h11's default, said here)
_MAX_BACKLOG = 2048  # connections the kernel queues (and asyncio accepts in one go): a flood's burst waits here, not in SYN retries
_FD_RESERVE = 256  # open files the process needs besides its connections (model, libraries, logs, pipes)
_EVICT_GRACE_S = 1.0  # a connection not yet read from is not closed to admit another for this long,
_EVICT_GRACE_TICKS = 3  # nor before the server's loop has ticked (every 0.1 s when it is free) this often
_EVICT_SCAN = 64  # idle connections looked at, oldest first, for one to close
_SUMMARY_INTERVAL_S = 10.0  # connection trouble is logged as one line per this many seconds at most
# asyncio's accept() failures that mean "out of a resource" (it pauses accepting for a second)
_ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# uvicorn's per-event warnings (by how they start) that hostile traffic turns into floods; counted instead
_UVICORN_FLOODS = {
    "Invalid HTTP request received.": "invalid",
    "Exceeded concurrency limit.": "over_limit",
    "Unsupported upgrade request.": "upgrade",
    "No supported WebSocket library detected.": "",  # the second line of the one above: dropped, not counted
}


def _raw_error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response in the one error shape, for a connection no request has reached."""
    body = json.dumps(error_body(message)).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionGuard:
    """One server's connections: the cap, the request-head deadline, and what they close, counted.

    `idle`: the connections not in a request (waiting for a request head, or for the rest of a
    body nobody reads), least recently heard from first: at the cap the first is closed to
    admit a new one, if it has had its chance to send a head (`evict`: a flood's burst must not
    close a connection before it was read); when none has, the new one is admitted over the cap,
    up to `ceiling` (the cap plus `burst`, an accept batch), and past that refused (503); `trim`
    brings the count back to the cap as soon as they have been read.
    `log_summary()` writes one line for what happened since the last line, at most every
    `interval_s`.
    """

    def __init__(
        self, max_connections: int, header_timeout_s: float, burst: int = 0, interval_s: float = _SUMMARY_INTERVAL_S
    ) -> None:
        self.max_connections = max_connections
        self.ceiling = max_connections + burst  # a burst of just-opened connections may pass the cap up to here
        self.header_timeout_s = header_timeout_s
        self.interval_s = interval_s
        self.open = 0
        self.ticks = 0  # the server's ticks (GuardedServer.on_tick): the event loop's turns, as seen here
        self.idle: collections.OrderedDict[Any, float] = collections.OrderedDict()  # protocol -> when last heard from
        self.counts: collections.Counter[str] = collections.Counter()
        self.accept_error = ""
        self._last = time.monotonic()

    def evict(self) -> bool:
        """Closes the idle connection heard from longest ago among those that had their chance: it
        has sent something since it became idle (was read), or it has been idle `_EVICT_GRACE_S`
        and the event loop has turned `_EVICT_GRACE_TICKS` times meanwhile (a loop slowed by a
        flood, or by a busy machine, has not yet read what is waiting). A connection just accepted
        is spared until its first bytes are read, however many come after it in a flood's burst.
        False when none of the first `_EVICT_SCAN` qualifies."""
        now = time.monotonic()
        for protocol, heard in itertools.islice(self.idle.items(), _EVICT_SCAN):
            had_its_chance = now - heard >= _EVICT_GRACE_S and self.ticks - protocol.idle_tick >= _EVICT_GRACE_TICKS
            if protocol.read_since_idle or had_its_chance:
                del self.idle[protocol]
                protocol.close_idle(evicted=True)
                return True
        return False

    def trim(self) -> None:
        """Closes idle connections past their grace while more than `max_connections` are open:
        a burst admitted over the cap is brought back to it within the grace (`GuardedServer`
        calls this every tick, and every new connection does)."""
        while self.open > self.max_connections and self.evict():
            pass

    def heard(self, protocol: Any) -> None:
        """`protocol` is idle and was just heard from: it goes last in the eviction order."""
        self.idle.pop(protocol, None)
        self.idle[protocol] = time.monotonic()

    def handle_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's exception handler: a failed accept (out of files or memory) is counted
        for the summary; anything else goes to asyncio's own handler."""
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in _ACCEPT_ERRNOS and "accept" in str(context.get("message")):
            self.counts["accept_failed"] += 1
            self.accept_error = os.strerror(error.errno)
            return
        loop.default_exception_handler(context)

    def filter(self, record: logging.LogRecord) -> bool:
        """A logging filter for uvicorn's logger: its per-request floods are counted, not written."""
        message = str(record.msg)
        what = next((kind for start, kind in _UVICORN_FLOODS.items() if message.startswith(start)), None)
        if what is None:
            return True
        if what:
            self.counts[what] += 1
        return False

    def log_summary(self, force: bool = False) -> str | None:
        """Logs (warning) and returns the line for what was counted since the last one, when
        `interval_s` has passed (or `force`) and anything was; else None."""
        now = time.monotonic()
        if not self.counts or (not force and now - self._last < self.interval_s):
            return None
        counts, self.counts = self.counts, collections.Counter()
        parts = []
        if counts["head_timeout"]:
            parts.append(f"{counts['head_timeout']} closed for not sending a request head within "
                         f"{self.header_timeout_s:g} s (serve.header_timeout_s)")
        if counts["evicted"]:
            parts.append(f"{counts['evicted']} idle ones closed to admit new ones at serve.max_connections "
                         f"{self.max_connections}")
        if counts["refused"]:
            parts.append(f"{counts['refused']} refused with 503, all {self.max_connections} busy or just opened")
        if counts["invalid"]:
            parts.append(f"{counts['invalid']} invalid requests answered 400")
        if counts["upgrade"]:
            parts.append(f"{counts['upgrade']} upgrade requests (WebSocket) answered as plain HTTP")
        if counts["over_limit"]:
            parts.append(f"{counts['over_limit']} requests over uvicorn's concurrency limit answered 503")
        if counts["accept_failed"]:
            parts.append(f"{counts['accept_failed']} accepts failed ({self.accept_error}); accepting paused 1 s each")
        line = f"serve: connections in the last {now - self._last:.0f} s: " + "; ".join(parts)
        self._last = now
        log.warning("%s", line)
        return line


class _GuardedConnection:
    """What `GuardedH11Protocol` adds to uvicorn's h11 protocol (it comes first in the class's
    bases, so `super()` here is uvicorn's): `guard`'s deadline, cap and counts (see the module
    docstring). Uses the protocol's `transport`, `conn`, `cycle` and `loop`."""

    guard: ConnectionGuard  # set by _guarded_protocol
    _counted = True  # in guard.open
    read_since_idle = False  # bytes arrived since it last became idle (ConnectionGuard.evict)
    idle_tick = 0  # guard.ticks when it last became idle
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        if self.guard.open >= self.guard.ceiling and not self.guard.evict():
            self.guard.counts["refused"] += 1
            self._counted = False
            transport.write(_raw_error(503, f"all {self.guard.max_connections} connections are busy or just opened "
                                            "(serve.max_connections); retry shortly"))
            transport.close()
            return
        self.guard.open += 1
        super().connection_made(transport)
        self._become_idle()
        self.guard.trim()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:  # refused in connection_made: uvicorn never saw it
            return
        self._uncount()
        self._stop_idle()
        super().connection_lost(exc)

    def _uncount(self) -> None:
        """Leaves `guard.open` (once): when we close a connection, at once, not a turn of the loop later."""
        if self._counted:
            self._counted = False
            self.guard.open -= 1

    def data_received(self, data: bytes) -> None:
        self.read_since_idle = True
        super().data_received(data)
        if self.transport.is_closing() or self._busy():
            self._stop_idle()
        elif self._deadline is None:
            self._become_idle()
        else:
            self.guard.heard(self)  # the longest-silent are closed first

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._busy():
            self._become_idle()

    def send_400_response(self, msg: str) -> None:
        """A malformed request (or a head over `_MAX_HEAD_BYTES`): 400 in the one error shape."""
        import h11

        body = json.dumps(error_body(
            f"invalid HTTP request (malformed, or its head over {_MAX_HEAD_BYTES} bytes)")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            pass  # too far into a response to send another: just close
        self.transport.close()

    def _busy(self) -> bool:
        """A request of this connection is in the app (its head complete, its answer not sent)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _become_idle(self) -> None:
        self._stop_idle()
        self._deadline = self.loop.call_later(self.guard.header_timeout_s, self._deadline_passed)
        self.read_since_idle = False
        self.idle_tick = self.guard.ticks
        self.guard.heard(self)

    def _stop_idle(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.guard.idle.pop(self, None)

    def _deadline_passed(self) -> None:
        self._deadline = None
        self.guard.idle.pop(self, None)
        self.guard.counts["head_timeout"] += 1
        self.close_idle(evicted=False)

    def close_idle(self, evicted: bool) -> None:
        """Closes this idle connection: 408 first when part of a request head has arrived."""
        import h11

        self._stop_idle()
        if self.transport.is_closing():
            return
        self._uncount()
        if evicted:
            self.guard.counts["evicted"] += 1
            self.transport.abort()  # its file descriptor is wanted now
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self.transport.write(_raw_error(408, f"the request head did not arrive within "
                                                 f"{self.guard.header_timeout_s:g} s (serve.header_timeout_s)"))
        self.transport.close()


def _guarded_protocol(guard: ConnectionGuard) -> type:
    """uvicorn's h11 protocol with `guard`'s deadline, cap and counts (`_GuardedConnection`)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return type("GuardedH11Protocol", (_GuardedConnection, H11Protocol), {"guard": guard})


def raise_open_file_limit() -> int:
    """Raises this process's soft limit on open files to its hard limit; returns the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("serve: cannot raise the open-file limit from %d to %d (%s)", soft, target, error)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def accept_backlog(open_files: int) -> int:
    """The listen backlog: `_MAX_BACKLOG`, or a quarter of what the open-file limit leaves, at least 64.
    asyncio accepts up to this many connections before the protocol sees any, so they need files too."""
    return min(_MAX_BACKLOG, max(64, (open_files - _FD_RESERVE) // 4))


def connection_cap(limits: ServeConfig, open_files: int) -> int:
    """serve.max_connections, lowered to fit the open-file limit less two accept batches (one
    being accepted, one burst over the cap, `ConnectionGuard.ceiling`) and `_FD_RESERVE`.
    CaptionerError when the limit leaves room for none."""
    room = open_files - 2 * accept_backlog(open_files) - _FD_RESERVE
    if room < 1:
        raise CaptionerError(
            f"the open-file limit ({open_files}) leaves no room for connections; raise it (ulimit -n) "
            f"to at least {2 * 64 + _FD_RESERVE + 64}"
        )
    if room < limits.max_connections:
        log.info("serve: at most %d connections (serve.max_connections %d does not fit the open-file limit %d)",
                 room, limits.max_connections, open_files)
    return min(limits.max_connections, room)


def build_server(app: Any, limits: ServeConfig, open_files: int | None = None) -> Any:
    """A uvicorn.Server for `app` with the connection guard (see the module docstring); `.guard` is
    its ConnectionGuard. open_files: the open-file limit to fit the cap under (None: read it)."""
    import uvicorn

    if open_files is None:
        import resource

        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    guard = ConnectionGuard(connection_cap(limits, open_files), limits.header_timeout_s, burst=accept_backlog(open_files))
    uvicorn_log = logging.getLogger("uvicorn.error")
    for old in [f for f in uvicorn_log.filters if isinstance(getattr(f, "__self__", None), ConnectionGuard)]:
        uvicorn_log.removeFilter(old)
    uvicorn_log.addFilter(guard.filter)

    class GuardedServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            asyncio.get_running_loop().set_exception_handler(guard.handle_loop_exception)
            await super().startup(sockets=sockets)

        async def on_tick(self, counter: int) -> bool:
            guard.ticks += 1
            guard.trim()  # ticks are 0.1 s apart
            if counter % 10 == 0:
                guard.log_summary()
            return await super().on_tick(counter)

    uv_config = uvicorn.Config(
        app,
        log_config=None,
        server_header=False,
        http=_guarded_protocol(guard),
        ws="none",  # no WebSocket endpoint: an upgrade request must not take its connection out of the guard's count
        timeout_keep_alive=_KEEP_ALIVE_S,
        # uvicorn's own cap counts idle connections too, so alone it would answer every request
        # 503 while a slowloris holds them; the guard keeps connections under the cap by closing
        # idle ones (closed ones linger in uvicorn's count until the loop's next turn: at most an
        # accept batch), and this stays as a backstop that never triggers before it.
        limit_concurrency=guard.ceiling + accept_backlog(open_files) + 1,
        h11_max_incomplete_event_size=_MAX_HEAD_BYTES,
        backlog=accept_backlog(open_files),
    )
    server = GuardedServer(uv_config)
    server.guard = guard
    return server
