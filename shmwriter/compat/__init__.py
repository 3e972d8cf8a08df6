"""Drop-in replacements for other projects' writers.

- :mod:`shmwriter.compat.dcnum`: ``QueueWriterThread`` and ``QueueWriterProcess``
  with dcnum's constructor and file layout; pass a :class:`shmwriter.EventQueue`
  as ``event_queue`` for the zero-copy path.
"""
