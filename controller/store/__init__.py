"""Persistence: SQLAlchemy 2.0 async models, the database handle and the unit of work.

Everything the controller persists goes through here; nothing outside this package builds
SQL. The same code runs on the embedded SQLite default and on PostgreSQL (asyncpg).
"""
