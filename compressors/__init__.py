"""Compressors: one file per paper, each a Lightning callback registered in
``effml.registry.COMPRESSORS`` with a typed config. The contract is ``compressors.base.Compressor``."""
