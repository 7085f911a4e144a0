"""The threads engines run on: long-lived daemon threads with a deep stack, reused from one
engine to the next instead of a new thread per engine.

XLA compiles a program on the thread that first calls it, so an engine's thread compiles
(its warm-up, or each new shape); a 256 MiB stack (address space, touched only as deep as it
goes) leaves LLVM room, and reusing threads keeps a process that starts and stops many
engines (the test suite) from making a thread per engine. (The SIGSEGVs in XLA:CPU compiles
that prompted this came from the test workers reaching vm.max_map_count: tests/conftest.py.)
"""
from __future__ import annotations

import queue
import threading

STACK_BYTES = 256 * 1024 * 1024
_idle: queue.SimpleQueue = queue.SimpleQueue()  # the inboxes of threads with nothing to run


class Handle:
  """A job running on an engine thread: is_alive() until it returns, join(timeout)."""

  def __init__(self):
    self._done = threading.Event()

  def is_alive(self) -> bool:
    return not self._done.is_set()

  def join(self, timeout: float | None = None):
    self._done.wait(timeout)


def run(target, args=()) -> Handle:
  """Runs target(*args) on an idle engine thread, or on a new one."""
  handle = Handle()
  try:
    inbox = _idle.get_nowait()
  except queue.Empty:
    inbox = queue.SimpleQueue()
    thread = threading.Thread(target=_serve, args=(inbox,), name="fdjax-engine", daemon=True)
    previous = threading.stack_size(STACK_BYTES)
    try:
      thread.start()
    finally:
      threading.stack_size(previous)
  inbox.put((target, args, handle))
  return handle


def _serve(inbox):
  while True:
    target, args, handle = inbox.get()
    try:
      target(*args)
    except BaseException:  # noqa: BLE001 - the job's own error handling has run; go on
      pass
    finally:
      handle._done.set()
      _idle.put(inbox)
