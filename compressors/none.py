"""The dense baseline: trains the model as it is, so every table has its reference row."""

from dataclasses import dataclass

from effml.compressors.base import Compressor, CompressorConfig
from effml.registry import COMPRESSORS


@dataclass
class NoneConfig(CompressorConfig):
    """Dense baseline: no compression."""

    name: str = "none"


@COMPRESSORS.register("none", NoneConfig)
class NoCompression(Compressor):
    """Dense baseline: no compression, one training stage."""

    tasks = ("classification", "lm")
