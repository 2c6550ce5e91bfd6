"""bigcat's input and output, private: what the public modules read and write through.

``fs`` (local paths and URLs alike), ``sniff`` (what a path holds), ``source`` and
``backends`` (lazy reading of a matrix and its annotations), ``annotations`` (obs/var/uns),
``transpose`` (CSC to CSR), ``layout`` (what outputs look like), ``writers``, ``shards``
(bigcat's own shard reader and writer), ``copy`` (the parallel copy), ``publish`` (atomic
outputs, the completion marker) and ``checkpoints`` (resumable conversions).
"""
