"""Small shared parts: norms, positional encodings, initialisation."""
