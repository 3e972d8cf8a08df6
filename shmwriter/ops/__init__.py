"""The operator's side: what the command line's subcommands do, as library functions.

``inspect``  how a file's run ended: complete, interrupted, aborted, failed; its gaps
``runs``     the runs on this machine: ``status``, ``top``, ``clean``
``replay``   replay a recorded .rtdc through producers and a Writer
``demo``     a short run with synthetic events
``memory``   the memory (PSS) of a process tree
``text``     tables and sizes for the command line
"""
