"""0007: an adapter trained by sft_then_dpo records the preference dataset of its DPO stage beside its (SFT) dataset."""

import sqlalchemy as sa
from alembic.operations import Operations


def upgrade(op: Operations) -> None:
    with op.batch_alter_table("adapter_version") as batch:
        batch.add_column(sa.Column("preference_dataset_name", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("preference_dataset_version", sa.Integer(), nullable=True))
