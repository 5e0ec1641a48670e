"""Storage: tables, migrations, every SQL statement, the engine factory.

Nothing outside this package imports sqlalchemy.
"""
