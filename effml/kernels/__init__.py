"""Hardware targets: resolve the configured target on the actual machine and apply its kernel
settings (precision, matmul precision, attention backends), recording what was chosen."""
