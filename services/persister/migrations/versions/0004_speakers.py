"""Speakers the bot knows: who said a segment's speaker (`speaker_source`), and the meeting a session is a track of
(`meeting_id`, `track_start`: the wall time of its first sample), so a meeting's tracks merge in time order.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("segments", sa.Column("speaker_source", sa.Text))
    op.add_column("segments", sa.Column("meeting_id", sa.Text))
    op.add_column("segments", sa.Column("track_start", sa.Double, nullable=False, server_default=sa.text("0")))
    op.create_index(
        "segments_by_meeting", "segments", ["tenant", "meeting_id"], postgresql_where=sa.text("meeting_id IS NOT NULL")
    )


def downgrade() -> None:
    op.drop_index("segments_by_meeting", "segments")
    for name in ("track_start", "meeting_id", "speaker_source"):
        op.drop_column("segments", name)
