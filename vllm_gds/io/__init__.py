"""The read engine: shard bytes from files into device (or host) memory."""
