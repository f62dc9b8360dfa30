#!/usr/bin/env python3
"""End-to-end DDIM sampling benchmark (the same as ``tgpq bench``): see ``src/tgpq/eval/bench/__init__.py``
for what it measures, its models, variants and outputs.

    python benchmarks/bench_sampling.py [--quick] [--models ...] [--batches ...] [--variants ...] [--out DIR]
"""
import sys

from tgpq.eval.bench import main

if __name__ == "__main__":
    main()
    sys.exit(0)
