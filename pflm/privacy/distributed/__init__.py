"""Distributed DP (issue 18): devices add discrete noise shares under secure aggregation; the server never adds noise.

Modules: `rotation` (public randomised Hadamard), `discrete` (device CSPRNG samplers: Skellam, discrete Gaussian),
`accounting` (RDP of the Skellam / distributed discrete Gaussian sums, Poisson subsampling, calibration),
`codec` (the device's encoding into Z_2^b and the server's decoding, plugged into `SecureAggregator`),
`mechanism` (the run's `DistributedDP`: parameters, per-round accounting of the survivors' noise).
See docs/distributed_dp.md.
"""
