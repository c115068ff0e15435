"""Alembic migrations for the lifecycle schema (the only way the schema changes)."""
