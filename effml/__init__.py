"""effml: config-driven experiments for efficient machine learning.

The core lives here (config schema, registries, the stage loop, measurement); the plug-ins live in
the sibling folders of the repository, installed as `effml.models`, `effml.data`,
`effml.compressors`, `effml.kernels`; configs and recipes ship as `effml.conf` / `effml.recipes`.
"""

__version__ = "0.1.0"
