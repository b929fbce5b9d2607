"""The co-execution engine: records eager iterations into a TraceGraph, runs later iterations
as a Python skeleton whose ops are deferred into compiled graphs, and falls back to eager when
the program leaves what was recorded. It reports through `events` and imports nothing of
IPython or widgets; `terra_nb.notebook` is its only user interface."""
