"""SQL text -> StatementFacts, with PostgreSQL's own parser."""

from dbguard.analyze.facts import AnalysisError, StatementFacts
from dbguard.analyze.pgparse import analyze, cache_key, recorded_text

__all__ = ["AnalysisError", "StatementFacts", "analyze", "cache_key", "recorded_text"]
