"""The ``effml`` command line: ``train`` (Hydra), ``list``, ``report``."""
