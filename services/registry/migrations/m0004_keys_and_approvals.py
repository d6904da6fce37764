"""0004: API keys hashed under a server pepper, with expiry, last use and rotation; approvals by people.

Existing key rows keep their sha256(salt + secret) in `secret_sha256` and still verify: the first
successful check rewrites the row as HMAC-SHA256 under the pepper (`secret_hmac`) and clears the old
hash, so no key handed out before this migration stops working and none stays on the old scheme
once used. The `approval` table holds an approver's yes to one production promotion.
"""

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    with op.batch_alter_table("api_key") as batch:
        batch.alter_column("secret_sha256", existing_type=sa.String(length=64), nullable=True)
        batch.add_column(sa.Column("secret_hmac", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("rotated_from", sa.String(length=64), nullable=True))
    op.create_table(
        "approval",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("object_type", sa.String(length=50), nullable=False),
        sa.Column("object_id", sa.String(length=300), nullable=False),
        sa.Column("target", sa.String(length=100), nullable=False),
        sa.Column("approved_by", sa.String(length=256), nullable=False),
        sa.Column("approved_role", sa.String(length=16), nullable=False),
        sa.Column("approved_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("used_by", sa.String(length=256), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_approval_object", "approval", ["object_type", "object_id"], unique=False)
