"""The writer's side of a run, in the order the data flows through it.

``run``          RunConfig, RunResult: what the loop is given (the Writer's arguments
                 checked), how the run ended
``entry``        the writer process's entry point (or the writer thread's)
``loop``         WriterLoop: reads the sockets and passes events between the rooms below
``channels``     the server's ends of the producers' pipes (an EventQueue's hub's too)
``intake``       FrameIntake: frame descriptors checked, their slots held, the frames handed on
``slots``        SlotAllocator: which slot is free, granted or held by frames (the hub's too)
``assemble``     FrameAssembler: frames into frame order, into chunks, and out of the ring
``reorder``      ReorderBuffer: the frontier, frames waiting for earlier ones, the gaps
``gather``       ChunkGatherer: write_threshold frames into one chunk of columns
``columns``      ChunkColumn: a feature's rows laid out as the file stores its HDF5 chunks
``sink_thread``  SinkThread: chunks to the file from a bounded queue (the dcnum drop-in too)
``h5sink``       H5Sink: chunks into the /events datasets of the .rtdc file
``codec``        ChunkCodec: Zstd and fletcher32 of whole HDF5 chunks, in parallel
``header``       RunHeader: the run's state and figures in the ring header
``recover``      a dead writer's file made readable by any HDF5 reader
"""
