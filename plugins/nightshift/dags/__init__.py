"""DAG factories: the shapes several DAG files share (Airflow layer, like ``operators`` and ``ui``).

A DAG file under ``dags/`` calls a factory here; the factory wires operators from
``nightshift.operators`` and imports nothing heavy, so DAG files stay cheap to parse.
"""
