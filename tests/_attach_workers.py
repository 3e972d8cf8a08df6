"""Scripts that attach by ticket, started with subprocess.Popen (not multiprocessing).

The ticket reaches them base64-pickled on the command line, as it could through a job
scheduler or a file.
"""

from __future__ import annotations

import base64
import pickle
import sys

from _workers import events_of

import shmwriter


def ticket_from_argv() -> shmwriter.Ticket:
    ticket: shmwriter.Ticket = pickle.loads(base64.b64decode(sys.argv[1]))
    return ticket


def attach_and_put(first: int, stop: int, step: int) -> None:
    """Attach with the ticket, put frames ``range(first, stop, step)``, close."""
    with shmwriter.attach(ticket_from_argv()) as producer:
        for frame in range(first, stop, step):
            producer.put(frame, events_of(frame))
    print("done", flush=True)


def attach_and_wait() -> None:
    """Attach, say so, then wait to be killed before putting anything."""
    producer = shmwriter.attach(ticket_from_argv())
    print("attached", flush=True)
    sys.stdin.read()
    producer.close()


def unpickle_producer_and_put(first: int, stop: int) -> None:
    """A producer pickled with plain pickle (as Ray or Dask do) attaches where it lands."""
    with pickle.loads(base64.b64decode(sys.argv[1])) as producer:
        for frame in range(first, stop):
            producer.put(frame, events_of(frame))
    print("done", flush=True)
