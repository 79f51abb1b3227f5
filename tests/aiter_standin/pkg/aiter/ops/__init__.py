"""Stand-in for ``aiter.ops`` (only ``mhc`` is provided)."""
