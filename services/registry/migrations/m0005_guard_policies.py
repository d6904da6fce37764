"""0005: guard policies: immutable versions of what a gateway does inline with a model's traffic (the whole
model's, one route's or one prompt's: attached_to), and which version of each is active. A partial unique
index keeps each attachment to one policy name."""

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    op.create_table(
        "guard_policy_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("attached_to", sa.String(length=220), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version", name="uq_guard_policy_version"),
    )
    op.create_index(op.f("ix_guard_policy_version_name"), "guard_policy_version", ["name"], unique=False)
    op.create_index(
        "uq_guard_policy_one_per_attachment",
        "guard_policy_version",
        ["model_name", "attached_to"],
        unique=True,
        sqlite_where=sa.text("version = 1"),
        postgresql_where=sa.text("version = 1"),
    )
    op.create_table(
        "guard_policy_active",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
