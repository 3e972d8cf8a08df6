"""An EventQueue's parts, in the order a frame meets them.

``segment``  QueueSegment: header, slots and schema in one segment, unlinked at once
``client``   QueueClient: one thread's channel to the hub; QueueTicket, what a queue pickles
             into; FrameReader, a consumer with frames on their way
``hub``      QueueHub: the creator's thread that hands out slots and frames, with the
             Writer's protocol, slot allocator and liveness check
``leases``   EventLease (a frame taken, still in its slots) and EventReader
"""
