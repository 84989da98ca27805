"""effml: config-driven experiments for efficient machine learning.

The core lives here (config schema, registries, the stage loop, measurement) with the models
(`effml.models`), datamodules (`effml.data`) and kernels (`effml.kernels`). The compressors, the
CLI, configs and recipes live in the repository's top-level folders and are installed as
`effml.compressors`, `effml.cli`, `effml.conf` and `effml.recipes` (docs/ARCHITECTURE.md §10).
"""

__version__ = "0.1.0"
