"""Reports from run folders: the paper's figures, tables and a verdict per claim. Reports only read
what training wrote; they never train."""
from repro.reports.verdict import make_report

__all__ = ["make_report"]
