"""Integrations of the mhc ops into model libraries. Each submodule imports its library lazily,
so ``import mhc`` and ``import mhc.integrations`` work without any of them installed.

- :mod:`mhc.integrations.transformers`: DeepSeek-V4 in Hugging Face transformers.
"""
