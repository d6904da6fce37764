"""0003: a prompt label can carry an A/B share: the percent of production-label traffic its version gets."""

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    with op.batch_alter_table("prompt_label") as batch:
        batch.add_column(sa.Column("traffic_percent", sa.Float(), nullable=True))
