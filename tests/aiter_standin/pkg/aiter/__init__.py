"""Test stand-in for AMD's AITER (distribution ``amd-aiter``): only ``aiter.ops.mhc`` exists.

Not AMD's code and not shipped. ``tests/aiter_standin.install`` copies this package into a
temporary folder with an ``amd_aiter-<version>.dist-info``; ``aiter.ops.mhc`` reads that version
and reproduces the behaviour of that release.
"""
