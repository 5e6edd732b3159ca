"""Dynamic masking: which output columns hold masked data, and what the client gets instead."""
