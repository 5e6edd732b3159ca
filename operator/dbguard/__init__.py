"""dbguard: identity-aware PostgreSQL governance proxy."""

__version__ = "0.1.0"
