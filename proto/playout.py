"""A paced playout queue: audio a backend sent faster than real time, out one frame a tick.

Backends (TTS above all) send audio in bursts, seconds ahead of the caller. The caller's
jitter buffer wants one 20 ms frame every 20 ms, so the transceiver queues the backend's
frames here and takes them out on a steady clock. The queue is sans-IO: the driver asks
:meth:`PlayoutQueue.next_deadline`, sleeps until then, and calls
:meth:`PlayoutQueue.poll` with the time, which returns the frames due (to send now) and
the marks reached, in queue order.

Guarantees:

* **Pacing without drift.** Tick ``k`` of a run is at ``anchor + k * frame_duration``,
  computed by multiplication, never by adding intervals, so a late wake-up does not
  shift later ticks and ten minutes of ticks end where they should. Each tick plays at
  most one frame.
* **Late wake-ups catch up, a little.** If the driver wakes late, the frames of every
  tick that passed are due at once, up to ``max_catch_up`` of them; ticks beyond that
  are skipped (counted in ``skipped_ticks``), no frame is lost, and the rest of the queue
  plays later.
* **Underflow is silence.** When the queue runs dry, nothing is due (the caller hears
  silence; the RTP session marks the next talkspurt). If a frame arrives while the tick
  it would have played on is still current (less than one frame late), the run goes on
  on the same grid; otherwise a new run starts at the time of the poll that finds it. A
  new run never starts less than one frame after the previous frame's tick.
* **Marks fire in order.** A mark is reached at the tick on which the frame before it
  has finished playing, that is the tick after that frame's (or at once, if the queue
  held no frame before it).
* **Clear is immediate.** :meth:`PlayoutQueue.clear` drops every queued frame and mark
  and returns the dropped marks' names in order; since the frame of the current tick was
  already handed out, the next tick plays silence or newly queued audio.
* **Bounded.** At most ``max_queued`` seconds of frames and ``max_marks`` marks are held.
  A frame or mark that does not fit is refused (``enqueue``/``mark`` return False and
  ``overflow_frames``/``overflow_marks`` count it): the newest audio is dropped, never
  audio already queued, so what the caller hears stays contiguous.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Final

__all__ = ["FrameDue", "MarkReached", "PlayoutEvent", "PlayoutQueue"]

_DUE_NOW: Final = -math.inf


@dataclass(frozen=True, slots=True)
class FrameDue:
    """Send ``payload`` now; ``tick`` is the time it was scheduled for."""

    payload: bytes
    tick: float


@dataclass(frozen=True, slots=True)
class MarkReached:
    """Playout reached the mark ``name``: everything queued before it has played."""

    name: str


PlayoutEvent = FrameDue | MarkReached


class _Mark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class PlayoutQueue:
    """Frames and marks in order, handed out one frame per tick; see the module docstring."""

    def __init__(
        self,
        frame_duration: float = 0.02,
        *,
        max_queued: float = 30.0,
        max_marks: int = 1024,
        max_catch_up: int = 4,
    ) -> None:
        if not frame_duration > 0:
            raise ValueError(f"frame_duration must be positive, got {frame_duration!r}")
        if max_catch_up < 1:
            raise ValueError(f"max_catch_up must be at least 1, got {max_catch_up!r}")
        self.frame_duration = frame_duration
        self.max_frames = max(1, round(max_queued / frame_duration))
        self.max_marks = max_marks
        self.max_catch_up = max_catch_up
        self._items: deque[bytes | _Mark] = deque()
        self._frames = 0
        self._marks = 0
        self._anchor: float | None = None
        self._tick_index = 0
        self._dry = True
        """No frame was waiting for the current tick when it came up."""
        self.frames_played = 0
        self.overflow_frames = 0
        self.overflow_marks = 0
        self.cleared_frames = 0
        self.skipped_ticks = 0
        self.runs = 0
        """Times playout started afresh after being idle (first frame, or after an underflow)."""

    # ------------------------------------------------------------------ input

    @property
    def queued_frames(self) -> int:
        return self._frames

    @property
    def queued_marks(self) -> int:
        return self._marks

    @property
    def queued_seconds(self) -> float:
        return self._frames * self.frame_duration

    @property
    def idle(self) -> bool:
        """Nothing queued: no frame and no mark."""
        return not self._items

    def enqueue(self, payload: bytes) -> bool:
        """Queue one frame behind everything queued; False (dropped) if the queue is full."""
        if self._frames >= self.max_frames:
            self.overflow_frames += 1
            return False
        self._items.append(payload)
        self._frames += 1
        return True

    def mark(self, name: str) -> bool:
        """Queue a mark behind everything queued; False (dropped) if too many are pending."""
        if self._marks >= self.max_marks:
            self.overflow_marks += 1
            return False
        self._items.append(_Mark(name))
        self._marks += 1
        return True

    def clear(self) -> list[str]:
        """Drop every queued frame and mark; return the dropped marks' names in order."""
        dropped = [item.name for item in self._items if isinstance(item, _Mark)]
        self.cleared_frames += self._frames
        self._items.clear()
        self._frames = self._marks = 0
        self._dry = True
        return dropped

    # ------------------------------------------------------------------ output

    def next_deadline(self) -> float | None:
        """When to call :meth:`poll` next: None when nothing is queued.

        The time may be in the past (``-inf`` when a new run can start at once): poll now.
        """
        if not self._items:
            return None
        if self._anchor is None:
            return _DUE_NOW
        return self._tick_time(self._tick_index)

    def poll(self, now: float) -> list[PlayoutEvent]:
        """Return the frames due and marks reached by ``now``, in queue order."""
        events: list[PlayoutEvent] = []
        if not self._items:
            return events
        duration = self.frame_duration
        if self._anchor is None:
            self._start_run(now)
        elif self._dry:
            # The queue ran dry and refilled: keep the grid if the current tick is still
            # under way, else start a new run now (never within a frame of the last tick).
            if now >= self._tick_time(self._tick_index) + duration:
                self._start_run(now)
        else:
            due = math.floor((now - self._anchor) / duration) - self._tick_index + 1
            if due > self.max_catch_up:
                skip = due - self.max_catch_up
                self._tick_index += skip
                self.skipped_ticks += skip
        items = self._items
        while items:
            tick = self._tick_time(self._tick_index)
            if tick > now:
                break
            while items and isinstance(items[0], _Mark):
                events.append(MarkReached(items.popleft().name))  # type: ignore[union-attr]
                self._marks -= 1
            if not items:
                self._dry = True
                return events
            payload = items.popleft()
            self._frames -= 1
            self.frames_played += 1
            self._tick_index += 1
            events.append(FrameDue(payload, tick))  # type: ignore[arg-type]
        # Leading marks fire with the next frame's tick, so only frames decide dryness.
        self._dry = self._frames == 0
        return events

    def _start_run(self, now: float) -> None:
        self._anchor = now
        self._tick_index = 0
        self._dry = False
        self.runs += 1

    def _tick_time(self, index: int) -> float:
        assert self._anchor is not None
        return self._anchor + index * self.frame_duration
