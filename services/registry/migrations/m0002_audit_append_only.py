"""0002: the audit log refuses UPDATE and DELETE in the database itself, not only by the service's habit.

Anyone with write access to the database (a script, a console, a compromised service) could otherwise
rewrite history. On PostgreSQL TRUNCATE is refused too; dropping the table needs its owner, which
production should reserve to migrations.
"""

from alembic.operations import Operations

SQLITE = [
    """CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END""",
]

POSTGRESQL = [
    """CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
    END $$""",
    """CREATE TRIGGER audit_log_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()""",
    """CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()""",
]


def upgrade(op: Operations) -> None:
    dialect = op.get_bind().dialect.name
    statements = {"sqlite": SQLITE, "postgresql": POSTGRESQL}.get(dialect)
    if statements is None:
        raise NotImplementedError(f"no append-only audit triggers for {dialect}")
    for statement in statements:
        op.execute(statement)
