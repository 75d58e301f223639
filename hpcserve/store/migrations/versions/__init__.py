"""Alembic revision files, oldest first: 0001_initial, 0002_..."""
