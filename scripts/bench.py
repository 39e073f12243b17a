"""The peer benchmark: fusetune against hf, liger and unsloth, one subprocess each. The code is the package
scripts/bench/ (its __init__ says what is measured); this file keeps ``python scripts/bench.py ...`` the
command, and is what every job subprocess runs."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # runpy.run_path does not put scripts/ there
    from bench.__main__ import main

    main()
