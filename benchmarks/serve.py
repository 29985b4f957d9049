"""Serving benchmark: the code lives in `recursify.bench.serve` (also `recursify bench-serve`).

    python benchmarks/serve.py --student runs/c30 --requests 24 --rate 8 --prompt-len 64 --output-len 16 \
        --hf-batching --speculative 3 --out benchmarks/results/serve.json
"""

import sys

from recursify.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
