"""The DATA phase of the SMTP listener, read in blocks.

aiosmtpd reads the message line by line: for every line an await, a search of the stream's
buffer and two copies (about 700 of each for a 50 KB message), then the lines are de-dotted
one by one and joined. Here the stream is searched for the only bytes that can end the data,
``.<CRLF>``, so the message arrives in a few blocks whatever its line count; every block is
one search and one copy, the line lengths are checked with one split per block, and the dots
are taken off with one replace over the whole message.

Same rules and replies as aiosmtpd's own reader, which tests/test_listener_fastpath.py
compares with this one: a line longer than ``max_line`` bytes (CRLF included) or data past
``max_size`` bytes is read to its end and discarded (RFC 5321 4.2.5: the reply comes after
the data), then answered 500 or 552.
"""

from __future__ import annotations

import asyncio
import enum

TERMINATOR = b".\r\n"  # the dot line, when it starts a line
CRLF = b"\r\n"


class Refusal(enum.Enum):
    """Why the data was read and thrown away, and the reply aiosmtpd gives for it."""

    TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
    TOO_MUCH = "552 Error: Too much mail data"


class LineLengths:
    """The longest line seen across blocks: a line may start in one block and end in a
    later one (even between its CR and its LF), so the unfinished last line is carried over."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0  # bytes of the unfinished last line (a trailing CR included)
        self.cr = False  # whether the last block ended with a CR

    def too_long(self, block: bytes) -> bool:
        lines = block.split(CRLF)
        first = len(lines[0])
        longest = 0
        if self.cr and block.startswith(b"\n"):  # the CRLF of the open line, split in two
            longest, self.open, first = self.open + 1, 0, first - 1
        if len(lines) == 1:
            self.open += first
        else:
            # Every finished line counts with its CRLF, as aiosmtpd counts it; the last
            # element is what follows the block's last CRLF, so it is still open.
            inner = max(map(len, lines[1:-1]), default=0)
            longest = max(longest, self.open + first + 2, inner + 2)
            self.open = len(lines[-1])
        self.cr = block.endswith(b"\r")
        return longest > self.limit or self.open > self.limit


async def read_data(reader: asyncio.StreamReader, max_size: int | None,
                    max_line: int) -> bytes | Refusal:
    """The message after ``354``, through the terminating dot line: its content de-dotted
    (RFC 5321 4.5.2), or why it was refused.

    The stream's limit (aiosmtpd sets the command line length) bounds every block: a search
    that finds no terminator within it hands over what it has searched
    (LimitOverrunError.consumed, which keeps the last two bytes back in case a terminator
    starts there), so no more than one buffer's worth is held beyond the message itself.
    """
    parts: list[bytes] = []
    size = 0
    refusal: Refusal | None = None
    lines = LineLengths(max_line)
    tail = CRLF  # the last two bytes read: the data starts a line, as if after a CRLF
    while True:
        try:
            block = await reader.readuntil(TERMINATOR)
            body = block[:-3]
            # A terminator only when the dot starts a line; the CRLF before it may have come
            # in the previous block.
            ended = (body[-2:] if len(body) >= 2 else (tail + body)[-2:]) == CRLF
            if ended:
                block = body
        except asyncio.LimitOverrunError as err:
            # No terminator within the stream's limit: take what was searched.
            block = await reader.readexactly(err.consumed)
            ended = False
        if block:
            size += len(block)
            tail = (tail + block[-2:])[-2:]
            if refusal is None:
                if max_size and size > max_size:
                    refusal, parts = Refusal.TOO_MUCH, []
                elif lines.too_long(block):
                    refusal, parts = Refusal.TOO_LONG, []
                else:
                    parts.append(block)
        if ended:
            break
    if refusal is not None:
        return refusal
    content = b"".join(parts)
    # A line that starts with a dot had one added by the client (RFC 5321 4.5.2).
    content = content.replace(b"\r\n.", b"\r\n")
    return content[1:] if content.startswith(b".") else content
