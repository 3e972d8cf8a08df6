"""The benchmark lab of ``shmwriter bench`` (and ``tools/bench.py``), apart from the library.

Only the ``bench`` command imports it; nothing a user's program imports loads
any of it. Its rooms, in the order a run flows through them:

    config    BenchConfig: what to run (light: the command line's options come from it)
    _work     the workload (real or synthetic events) and the producer processes' loops
    _run      one run of one writer: shmwriter, dcnum's writer, plain h5py; its clocks
    suite     every run side by side; JSON and plot
    figures   what was measured: a run's figures, medians, ratios (BenchResult)
    _report   the table the command prints, and the plot
"""
