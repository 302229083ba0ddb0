"""The run driver: one round loop for every backend, with the device fan-out injected (`RunDriver`)."""
