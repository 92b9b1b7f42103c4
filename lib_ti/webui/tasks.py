"""Training tasks as the tab and the HTTP API see them. No host imports: a plain thread-safe registry."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

STATUSES = ("queued", "running", "done", "failed", "interrupted")


@dataclass
class Task:
    id: str
    name: str
    status: str = "queued"
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    val_loss: float | None = None
    eta_s: float | None = None
    output: str | None = None
    error: str | None = None
    message: str = ""
    load_check: str = ""
    recovery: str | None = None  # where a failed run kept its vectors
    created: float = field(default_factory=time.time)
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    norms: dict[str, list[float]] = field(default_factory=dict)
    previews: list[tuple[int, str]] = field(default_factory=list)  # (step, image path)
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stop: bool = False

    def public(self) -> dict[str, Any]:
        """The API's task body."""
        keys = ("status", "step", "max_steps", "loss", "val_loss", "eta_s", "output", "error", "recovery")
        return {"task_id": self.id, "name": self.name, **{k: getattr(self, k) for k in keys}}

    def detail(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("stop")
        return d


class TaskRegistry:
    """Recent tasks by id; old finished ones are dropped so a long-running server does not grow."""

    def __init__(self, keep: int = 100):
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()
        self.keep = keep

    def create(self, name: str, task_id: str | None = None) -> Task:
        task = Task(id=task_id or f"ti-{uuid.uuid4().hex[:12]}", name=name)
        with self._lock:
            self._tasks[task.id] = task
            finished = [t for t in self._tasks.values() if t.status not in ("queued", "running")]
            for old in sorted(finished, key=lambda t: t.created)[: max(0, len(self._tasks) - self.keep)]:
                del self._tasks[old.id]
        return task

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            return self._tasks.get(task_id)

    def all(self) -> list[Task]:
        with self._lock:
            return sorted(self._tasks.values(), key=lambda t: t.created, reverse=True)

    def latest(self) -> Task | None:
        tasks = self.all()
        return tasks[0] if tasks else None

    def update(self, task_id: str, **changes: Any) -> None:
        with self._lock:
            task = self._tasks[task_id]
            for k, v in changes.items():
                setattr(task, k, v)

    def request_stop(self, task_id: str) -> bool:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.status not in ("queued", "running"):
                return False
            task.stop = True
            return True


REGISTRY = TaskRegistry()
