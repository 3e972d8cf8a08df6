"""The shared state behind an EventQueue.

``shared``  QueueShared: one segment (unlinked at once), a token pipe, a descriptor socket
"""
