"""`scratchlm sweep`: every combination of a grid of config values trained into its own run folder, then
one table (`sweep.md`, `sweep.json`) and one overlay plot (`sweep.png`) read from the runs' metrics files."""
from scratchlm.sweep.report import run_summary, write_report  # noqa: F401
from scratchlm.sweep.runner import Combo, combinations, parse_grid, run_sweep  # noqa: F401
