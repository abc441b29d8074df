"""Server storage: SQLAlchemy 2 ORM tables, engine and session helpers."""
