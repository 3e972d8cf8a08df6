"""What travels between processes besides the ring: records, tickets, control messages.

``records``  the descriptor records a producer sends (frames, batches, requests) and grants
``grants``   SlotGrants: a producer's side of slot grants, the slots it holds and is owed
``link``     WriterLink: a producer's two pipe ends, its hello, and why the writer left
``attach``   Ticket and attach: a producer joins a run from any process of the same user
``control``  the messages between a Writer and its writer loop
"""
