"""The control socket between a Writer and its writer loop: the messages, both ways.

One SOCK_SEQPACKET socket pair joins the Writer (in the owner's process) and
the loop (in the writer process, or a thread). Every message is one packet
whose first byte says what it is.
"""

from __future__ import annotations

__all__ = [
    "MESSAGE_NBYTES",
    "MSG_ABORT",
    "MSG_HANDOUT_OVER",
    "MSG_LOG",
    "MSG_RESULT",
    "MSG_STARTED",
    "abort_message",
]

#: Writer -> loop: no more producers will be handed out (close() was called).
MSG_HANDOUT_OVER = b"H"
#: Writer -> loop: abort the run; the reason follows, UTF-8.
MSG_ABORT = b"A"
#: Loop -> Writer: the run has started.
MSG_STARTED = b"S"
#: Loop -> Writer: how the run ended; a zlib-compressed pickled RunResult follows.
MSG_RESULT = b"R"
#: Loop -> Writer: a log record (a pickled dict of its fields) follows.
MSG_LOG = b"L"
#: Largest message the loop reads from the Writer.
MESSAGE_NBYTES = 4096


def abort_message(reason: str) -> bytes:
    """The abort message carrying ``reason`` (cut to fit one message)."""
    return MSG_ABORT + reason.encode("utf-8")[:MESSAGE_NBYTES - 1]
