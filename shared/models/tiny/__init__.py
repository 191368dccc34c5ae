"""Tiny real-architecture checkpoints built from configs with random weights (no download).

Tests use them, and the embedded default uses them for its artist and perception entries, because no
real weights can be fetched on the machines this project is built on. They make the stack run every
code path of a real model; what they produce is noise, not art or insight.
"""
