"""The paced playout queue, driven by a fake clock: one frame a tick on a grid that does not
drift, bounded catch-up after a late wake-up, silence on underflow, marks in order, clear
within one frame, and a bounded size."""

import itertools
import random

import pytest

from voxrelay.proto.playout import FrameDue, MarkReached, PlayoutQueue

TICK = 0.02


def frame(number: int) -> bytes:
    return number.to_bytes(4, "big")


def number(event: FrameDue) -> int:
    return int.from_bytes(event.payload, "big")


class Driver:
    """Plays the part of the asyncio timer task: sleep until the deadline, then poll."""

    def __init__(self, queue: PlayoutQueue, now: float = 1000.0, lateness: float = 0.0) -> None:
        self.queue = queue
        self.now = now
        self.lateness = lateness
        self.frames: list[FrameDue] = []
        self.sent_at: list[float] = []
        self.marks: list[tuple[str, float]] = []
        self.rng = random.Random(7)

    def step(self) -> bool:
        """Wake at the next deadline (plus jitter) and poll; False if nothing is queued."""
        deadline = self.queue.next_deadline()
        if deadline is None:
            return False
        self.now = max(self.now, deadline) + self.rng.uniform(0, self.lateness)
        self.handle(self.queue.poll(self.now))
        return True

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, waking whenever the queue asks."""
        end = self.now + seconds
        while (deadline := self.queue.next_deadline()) is not None and deadline <= end:
            self.now = max(self.now, deadline)
            self.handle(self.queue.poll(self.now))
        self.now = end

    def handle(self, events: list) -> None:
        for event in events:
            if isinstance(event, FrameDue):
                self.frames.append(event)
                self.sent_at.append(self.now)
            else:
                assert isinstance(event, MarkReached)
                self.marks.append((event.name, self.now))


def test_an_empty_queue_has_no_deadline_and_nothing_due() -> None:
    queue = PlayoutQueue()
    assert queue.next_deadline() is None
    assert queue.poll(5.0) == []
    assert queue.idle


def test_the_first_frame_plays_at_once_and_the_rest_one_per_tick() -> None:
    queue = PlayoutQueue(TICK)
    for index in range(5):
        assert queue.enqueue(frame(index))
    assert queue.poll(10.0) == [FrameDue(frame(0), 10.0)]
    assert queue.poll(10.019) == []
    assert queue.next_deadline() == pytest.approx(10.02)
    assert queue.poll(10.02) == [FrameDue(frame(1), pytest.approx(10.02))]
    assert queue.queued_frames == 3
    assert queue.queued_seconds == pytest.approx(0.06)


def test_a_burst_faster_than_real_time_is_paced_one_frame_per_tick() -> None:
    queue = PlayoutQueue(TICK)
    driver = Driver(queue)
    for index in range(500):  # ten seconds of TTS, arriving at once
        queue.enqueue(frame(index))
    while driver.step():
        pass
    assert [number(event) for event in driver.frames] == list(range(500))
    gaps = {round(b.tick - a.tick, 9) for a, b in itertools.pairwise(driver.frames)}
    assert gaps == {TICK}


def test_ten_minutes_of_ticks_do_not_drift_despite_late_wakeups() -> None:
    queue = PlayoutQueue(TICK)
    driver = Driver(queue, now=12345.678, lateness=0.004)  # every wake-up 0-4 ms late
    total = 10 * 60 * 50
    fed = 0
    while fed < total or not queue.idle:
        while fed < total and queue.queued_frames < 25:  # a streaming backend, half a second ahead
            queue.enqueue(frame(fed))
            fed += 1
        driver.step()
    assert len(driver.frames) == total
    start = driver.frames[0].tick  # the first wake-up, itself a little late, anchors the grid
    last = driver.frames[-1]
    assert last.tick == pytest.approx(start + (total - 1) * TICK, abs=1e-6)
    assert driver.sent_at[-1] - last.tick < 0.005
    assert queue.runs == 1
    assert queue.skipped_ticks == 0
    for index in (0, 1, total // 2, total - 1):
        assert driver.frames[index].tick == pytest.approx(start + index * TICK, abs=1e-6)


def test_a_late_wakeup_catches_up_a_few_frames_then_skips_ticks_without_losing_audio() -> None:
    queue = PlayoutQueue(TICK, max_catch_up=4)
    for index in range(20):
        queue.enqueue(frame(index))
    assert len(queue.poll(0.0)) == 1
    # The loop stalled for 50 ms: the two ticks that passed are both due now.
    assert [number(e) for e in queue.poll(0.05)] == [1, 2]  # type: ignore[arg-type]
    # Stalled for 200 ms: at most four frames at once, the other ticks are skipped.
    due = queue.poll(0.25)
    assert [number(e) for e in due] == [3, 4, 5, 6]  # type: ignore[arg-type]
    assert queue.skipped_ticks == 6
    # The grid is unchanged: the next tick is still on it.
    assert queue.next_deadline() == pytest.approx(0.26)
    assert [number(e) for e in queue.poll(0.26)] == [7]  # type: ignore[arg-type]
    assert queue.queued_frames == 12


def test_underflow_plays_silence_and_a_refill_within_the_tick_stays_on_the_grid() -> None:
    queue = PlayoutQueue(TICK)
    queue.enqueue(frame(0))
    assert len(queue.poll(0.0)) == 1
    assert queue.next_deadline() is None  # dry: nothing to wake up for
    queue.enqueue(frame(1))  # arrives 5 ms after its tick began
    assert queue.poll(0.025) == [FrameDue(frame(1), pytest.approx(0.02))]
    assert queue.runs == 1
    assert queue.next_deadline() is None


def test_a_refill_after_a_whole_silent_tick_starts_a_new_run_at_once() -> None:
    queue = PlayoutQueue(TICK)
    queue.enqueue(frame(0))
    queue.poll(0.0)
    queue.enqueue(frame(1))
    queue.enqueue(frame(2))
    # 53 ms later: the ticks at 20 and 40 ms passed in silence, nothing is replayed.
    assert queue.poll(0.053) == [FrameDue(frame(1), 0.053)]
    assert queue.next_deadline() == pytest.approx(0.073)
    assert queue.runs == 2


def test_a_new_run_never_starts_within_a_frame_of_the_last_one() -> None:
    queue = PlayoutQueue(TICK)
    queue.enqueue(frame(0))
    queue.poll(0.0)
    queue.enqueue(frame(1))
    assert queue.poll(0.001) == []
    assert queue.next_deadline() == pytest.approx(0.02)


def test_marks_fire_in_order_when_the_audio_before_them_has_played() -> None:
    queue = PlayoutQueue(TICK)
    driver = Driver(queue, now=0.0)
    queue.mark("start")
    queue.enqueue(frame(0))
    queue.enqueue(frame(1))
    queue.mark("after-1")
    queue.mark("after-1-too")
    queue.enqueue(frame(2))
    queue.mark("end")
    while driver.step():
        pass
    assert [name for name, _ in driver.marks] == ["start", "after-1", "after-1-too", "end"]
    at = dict(driver.marks)
    assert at["start"] == 0.0
    assert at["after-1"] == pytest.approx(0.04)  # frame 1 played 20-40 ms
    assert at["end"] == pytest.approx(0.06)  # frame 2 played 40-60 ms
    assert queue.idle


def test_a_mark_on_an_idle_queue_waits_for_the_last_frame_to_finish() -> None:
    queue = PlayoutQueue(TICK)
    queue.enqueue(frame(0))
    queue.poll(1.0)
    queue.mark("done")
    assert queue.poll(1.01) == []
    assert queue.next_deadline() == pytest.approx(1.02)
    assert queue.poll(1.02) == [MarkReached("done")]


def test_clear_drops_everything_and_returns_the_dropped_marks_in_order() -> None:
    queue = PlayoutQueue(TICK)
    queue.enqueue(frame(0))
    queue.mark("a")
    queue.enqueue(frame(1))
    queue.mark("b")
    queue.enqueue(frame(2))
    assert queue.poll(0.0) == [FrameDue(frame(0), 0.0)]
    assert queue.clear() == ["a", "b"]
    assert queue.idle and queue.queued_marks == 0 and queue.queued_frames == 0
    assert queue.cleared_frames == 2
    assert queue.poll(0.02) == []


def test_audio_after_clear_is_heard_on_the_very_next_tick() -> None:
    queue = PlayoutQueue(TICK)
    for index in range(50):
        queue.enqueue(frame(index))
    queue.poll(0.0)
    queue.poll(0.02)
    queue.clear()  # barge-in at 31 ms
    queue.enqueue(frame(1000))
    assert queue.next_deadline() == pytest.approx(0.04)
    assert queue.poll(0.04) == [FrameDue(frame(1000), pytest.approx(0.04))]


def test_the_queue_is_bounded_and_refuses_the_newest_audio() -> None:
    queue = PlayoutQueue(TICK, max_queued=0.1, max_marks=2)
    results = [queue.enqueue(frame(index)) for index in range(8)]
    assert results == [True] * 5 + [False] * 3
    assert queue.overflow_frames == 3
    assert [queue.mark(name) for name in "xyz"] == [True, True, False]
    assert queue.overflow_marks == 1
    assert number(queue.poll(0.0)[0]) == 0  # type: ignore[arg-type]
    assert queue.enqueue(frame(99))  # room again once a frame has played


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="frame_duration must be positive"):
        PlayoutQueue(0)
    with pytest.raises(ValueError, match="max_catch_up must be at least 1"):
        PlayoutQueue(TICK, max_catch_up=0)


def test_random_interleavings_keep_order_spacing_and_accounting() -> None:
    rng = random.Random(1234)
    queue = PlayoutQueue(TICK, max_queued=0.5, max_marks=8)
    driver = Driver(queue, now=50.0, lateness=0.003)
    accepted_frames: list[int] = []
    accepted_marks: list[str] = []
    cleared_marks: list[str] = []
    for step in range(5000):
        action = rng.random()
        if action < 0.5:
            if queue.enqueue(frame(step)):
                accepted_frames.append(step)
        elif action < 0.55:
            if queue.mark(f"m{step}"):
                accepted_marks.append(f"m{step}")
        elif action < 0.56:
            cleared_marks += queue.clear()
        else:
            driver.advance(rng.uniform(0, 0.03))
    driver.advance(100.0)
    played = [number(event) for event in driver.frames]
    assert played == sorted(played)
    assert set(played) <= set(accepted_frames)
    assert len(played) + queue.cleared_frames == len(accepted_frames)
    reached = [name for name, _ in driver.marks]
    assert sorted(reached + cleared_marks, key=lambda n: int(n[1:])) == accepted_marks
    ticks = [event.tick for event in driver.frames]
    assert all(b - a >= TICK - 1e-9 for a, b in itertools.pairwise(ticks))
