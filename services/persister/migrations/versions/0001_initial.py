"""Sessions and segments.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_at = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("language", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("created_at", _at, nullable=False),
        sa.Column("ended_at", _at),
        sa.Column("chunks_received", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("audio_seconds", sa.Double, nullable=False, server_default=sa.text("0")),
        sa.Column("segment_count", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_activity", _at, nullable=False),
        sa.Column("worker_id", sa.Text),
        sa.PrimaryKeyConstraint("tenant", "session_id", name="sessions_pkey"),
        sa.CheckConstraint("status IN ('active', 'ended')", name="sessions_status"),
    )
    op.create_table(
        "segments",
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("session_id", sa.Text, nullable=False),
        sa.Column("segment_id", sa.BigInteger, nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("start_s", sa.Double, nullable=False),
        sa.Column("end_s", sa.Double, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("words", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("speaker", sa.Text),
        sa.Column("language", sa.Text),
        sa.Column("model", sa.Text),
        sa.Column("seq_first", sa.BigInteger, nullable=False),
        sa.Column("seq_last", sa.BigInteger, nullable=False),
        sa.Column("worker_id", sa.Text),
        sa.Column("published_at", _at),
        sa.Column("updated_at", _at, nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("tenant", "session_id", "segment_id", name="segments_pkey"),
        sa.CheckConstraint("status IN ('interim', 'final')", name="segments_status"),
    )
    op.create_index("segments_by_start", "segments", ["tenant", "session_id", "start_s"])


def downgrade() -> None:
    op.drop_index("segments_by_start", table_name="segments")
    op.drop_table("segments")
    op.drop_table("sessions")
