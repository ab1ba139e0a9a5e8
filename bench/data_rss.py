"""Peak RSS of collect + validate on the small and large folders a ``bench/data_scale.py --work`` run made.

    python bench/data_rss.py [WORK] [--repeats 2] [--out PATH]

``WORK`` is the ``--work`` folder of ``bench/data_scale.py`` (its ``small`` and ``big`` ImageFolders;
default /tmp/nsbench). Each set is collected and validated ``--repeats`` times, each time in a fresh
process. Writes bench/results/data_rss.json and renders docs/benchmarks-data.md again (its "Peak RSS
re-measured" section); with ``--out`` elsewhere it writes only that file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_scale as D  # noqa: E402

DEFAULT_OUT = D.RESULTS / "data_rss.json"


def _count(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", nargs="?", default="/tmp/nsbench", help="bench/data_scale.py's --work folder")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results file (default bench/results/data_rss.json)")
    args = ap.parse_args()
    work = Path(args.work)
    sets = (("small", work / "small"), ("large", work / "big"))
    for _, folder in sets:
        if not folder.is_dir():
            ap.error(f"{folder} is missing: run `python bench/data_scale.py --work {work}` first")
    out = {"date": time.strftime("%Y-%m-%d"), "small_n": _count(work / "small"), "large_n": _count(work / "big"),
           "runs": []}
    for r in range(args.repeats):
        for name, folder in sets:
            shutil.rmtree(work / f"rss-{name}", ignore_errors=True)
            res = D.collect(folder, work / f"rss-{name}", workers=2, validate=True)
            res.pop("stats", None)
            out["runs"].append({"set": name, "repeat": r, **res})
            print(name, r, res["peak_rss_mb"], res["workers_peak_rss_mb"], flush=True)
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    if dest.resolve() == DEFAULT_OUT.resolve() and (D.RESULTS / "data_scale.json").is_file():
        D.write_doc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
