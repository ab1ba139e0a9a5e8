"""Loading the plugin (as the scheduler, Dag processor and every task do) stays cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "onnxruntime", "evidently", "great_expectations", "mlflow", "docker", "sklearn", "pandas",
         "nightshift.ui.app", "fastapi")


def test_loading_plugins_imports_nothing_heavy_and_no_stray_modules():
    code = (
        "import json, sys\n"
        "from airflow import plugins_manager\n"
        "plugins_manager.get_operator_extra_links()\n"
        "names = [p.name for p in plugins_manager._get_plugins()[0]]\n"
        f"print(json.dumps({{'plugins': names, 'heavy': [h for h in {HEAVY!r} if h in sys.modules],\n"
        "    'stray': [m for m in ('training', 'collect', 'server', 'quality', 'links') if m in sys.modules]}))\n"
    )
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
           "PYTHONPATH": f"{ROOT / 'plugins'}:{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "nightshift" in result["plugins"]
    assert result["heavy"] == [], f"loading the plugin imports {result['heavy']}"
    assert result["stray"] == [], f"the plugin manager imported package modules as plugins: {result['stray']}"
