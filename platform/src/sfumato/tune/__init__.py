"""Ray Tune: hyper-parameter sweeps of the real trainer on low-resolution proxies."""
