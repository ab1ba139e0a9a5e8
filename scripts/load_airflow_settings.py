"""Load an Astro-style ``airflow_settings.yaml`` (pools, variables, connections)
into the Airflow metadata DB named by the environment. Idempotent."""

from __future__ import annotations

import json
import sys

import yaml


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        cfg = (yaml.safe_load(f) or {}).get("airflow") or {}
    from airflow.models import Connection, Variable
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session

    for p in cfg.get("pools") or []:
        Pool.create_or_update_pool(p["pool_name"], int(p["pool_slot"]), p.get("pool_description", ""),
                                   include_deferred=False)
    for v in cfg.get("variables") or []:
        Variable.set(v["variable_name"], v["variable_value"])
    with create_session() as session:
        for c in cfg.get("connections") or []:
            extra = c.get("conn_extra")
            conn = Connection(conn_id=c["conn_id"], conn_type=c["conn_type"], host=c.get("conn_host"),
                              schema=c.get("conn_schema"), login=c.get("conn_login"),
                              password=c.get("conn_password"), port=c.get("conn_port"),
                              extra=json.dumps(extra) if isinstance(extra, dict) else extra)
            session.query(Connection).filter(Connection.conn_id == conn.conn_id).delete()
            session.add(conn)
    print(f"airflow settings: {len(cfg.get('pools') or [])} pool(s), {len(cfg.get('variables') or [])} "
          f"variable(s), {len(cfg.get('connections') or [])} connection(s) loaded from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "airflow_settings.yaml"))
