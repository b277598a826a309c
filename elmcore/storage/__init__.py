"""Files: atomic writes and size-checked readers of untrusted files."""
