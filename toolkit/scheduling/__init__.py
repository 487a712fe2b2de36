"""Work items, the token-budget batcher, and the wire that carries work between processes.
No torch here: the batcher reaches the device through the `DeviceRunner` protocol."""
