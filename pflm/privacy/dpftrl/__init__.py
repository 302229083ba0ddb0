"""DP-FTRL: matrix-factorisation (correlated-noise) mechanisms that need no secret sampling."""
