"""The GPU suite (benchmarks/gpu_suite.py), by part: core (plan, Suite), steps, report, rehearse."""
