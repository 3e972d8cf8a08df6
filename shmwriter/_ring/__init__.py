"""Shared memory: the segment, the slot ring laid over it, and the figures in its header.

``segment``  named POSIX segments, reserved up front; created, attached, unlinked here only
``ring``     RingSpec and SlotRing: the header, the per-frame claimed flags, the slots
``fill``     SlotFiller: a producer's copies into its slots (masks stored as 0/255)
``stats``    RunStatistics: the figures a run publishes in its header, read by anyone
"""
