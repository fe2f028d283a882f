"""Persistence: SQLAlchemy 2.0 async models, the database handle and the unit of work.

Everything the controller persists goes through here: nothing outside this package builds a
statement that writes (the use cases add and delete the ORM rows of `models.py` through their
unit of work). Three read-only views build their own SELECTs beside the code that shows them: the
metrics' cluster gauges (`observability/cluster.py`), the web console's document
(`console/state.py`) and the health check's probe (`health.py`). The same code runs on the
embedded SQLite default and on PostgreSQL (asyncpg).

Where to look: `db.py` the database handle and the unit of work; `models.py` the tables;
`repositories/` the reads and writes, a module a kind of row (`tokens.py`, `audit.py`,
`metering.py`, `lease.py` and the others at this level are the rows with rules of their own);
`plans/` the plan applier (a plan's commit; the re-check it runs, `recheck.py`, is pure); `snapshot.py` the
whole cluster read into a problem document; `changes.py` the change log and the cluster's
generation; `migrate.py` the schema check at start.
"""
