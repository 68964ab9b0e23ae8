"""Session states: status 'rejected' beside 'active' and 'ended', and the reason a session ended or was refused.

`ended_at` is the time of a session's terminal event, whichever it was (ended or rejected).

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("reason", sa.Text))
    op.drop_constraint("sessions_status", "sessions", type_="check")
    op.create_check_constraint("sessions_status", "sessions", "status IN ('active', 'ended', 'rejected')")


def downgrade() -> None:
    # 0001 knew no 'rejected': such a session is stored as 'ended', as the persister of 0001 did.
    op.execute("UPDATE sessions SET status = 'ended' WHERE status = 'rejected'")
    op.drop_constraint("sessions_status", "sessions", type_="check")
    op.create_check_constraint("sessions_status", "sessions", "status IN ('active', 'ended')")
    op.drop_column("sessions", "reason")
