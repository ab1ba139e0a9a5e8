"""Peak RSS of collect + validate on the 20k and 200k folders bench/data_scale.py --work made (twice each)."""
import json, sys, shutil, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_scale as D
work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/nsbench")  # bench/data_scale.py --work folder
out = {"date": time.strftime("%Y-%m-%d"), "runs": []}
for r in range(2):
    for name, folder in (("small", work / "small"), ("large", work / "big")):
        shutil.rmtree(work / f"rss-{name}", ignore_errors=True)
        res = D.collect(folder, work / f"rss-{name}", workers=2, validate=True)
        res.pop("stats", None)
        out["runs"].append({"set": name, "repeat": r, **res})
        print(name, r, res["peak_rss_mb"], res["workers_peak_rss_mb"], flush=True)
Path(__file__).resolve().parent / "results" / "data_rss.json".write_text(json.dumps(out, indent=1) + "\n")
