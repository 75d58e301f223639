"""Alembic migrations of hpcserve's database (a package, so that installs carry the revision files)."""
