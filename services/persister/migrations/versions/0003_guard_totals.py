"""Guard totals: the words the transcriber's guards removed from a session's finals, and its finals that came
out empty over speech (SessionEvent.words_dropped, .empty_finals), set by its terminal event.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for name in ("words_dropped", "empty_finals"):
        op.add_column("sessions", sa.Column(name, sa.BigInteger, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    for name in ("empty_finals", "words_dropped"):
        op.drop_column("sessions", name)
