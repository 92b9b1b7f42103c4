"""modules/fifo_lock.py: a lock that wakes waiters in the order they came (the host's queue lock)."""

import collections
import threading


class FIFOLock:
    def __init__(self):
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending = collections.deque()

    def acquire(self, blocking=True):
        with self._inner_lock:
            if self._lock.acquire(False):
                return True
            if not blocking:
                return False
            event = threading.Event()
            self._pending.append(event)
        event.wait()
        return self._lock.acquire()

    def release(self):
        with self._inner_lock:
            if self._pending:
                self._pending.popleft().set()
            self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()
