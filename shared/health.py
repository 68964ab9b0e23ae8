"""Is a service ready? Each service names the things it needs (streams, consumers, model, database) and marks
each one up or down as it goes; the HTTP probes (`/readyz`) and the NATS micro-service health endpoint answer
from this one object, so they never disagree."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Readiness:
    """The checks a service must pass before it is ready, each with why it is not (empty: it passes)."""

    service: str
    checks: dict[str, str] = field(default_factory=dict)

    def need(self, *names: str) -> Readiness:
        """Declare checks that start out failing ("starting")."""
        for name in names:
            self.checks.setdefault(name, "starting")
        return self

    def up(self, name: str) -> None:
        self.checks[name] = ""

    def down(self, name: str, why: str) -> None:
        self.checks[name] = why or "down"

    @property
    def ready(self) -> bool:
        return all(not why for why in self.checks.values())

    def report(self) -> dict[str, object]:
        """What a probe returns: ready or not, and each check's state."""
        return {
            "service": self.service,
            "ready": self.ready,
            "checks": {name: (why or "ok") for name, why in sorted(self.checks.items())},
        }
