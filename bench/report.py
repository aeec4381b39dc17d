"""Regenerate the README's results table and bench/results/speedup.png from the newest GPU
CSV in bench/results/:  python bench/report.py"""

import os
import sys

from sdvae.bench.report import update_readme

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    body = update_readme(os.path.join(root, "README.md"), os.path.join(root, "bench", "results"))
    sys.stdout.write(body)
