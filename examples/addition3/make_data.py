"""Three-digit addition with worked column-by-column demonstrations (the learning study's task B).

    python examples/addition3/make_data.py [--train 2000] [--eval 200] [--seed 0] [--out DIR]

The same data as examples/addition (splits disjoint as unordered pairs, four phrasings held out),
with three-digit operands: the base model solves about 2.5% of these greedily, so plain RFT has
little reward to learn from and the demonstrations have to carry the signal.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.addition.make_data import main

if __name__ == "__main__":
    main(digits=3, out=Path(__file__).parent)
