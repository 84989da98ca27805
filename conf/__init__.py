"""effml's config groups (model, data, compressor, hardware, trainer, logger), shipped as package data."""
