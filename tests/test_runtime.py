"""The runtime's choices: the CPU thread count under contention."""

import random

from llama.runtime import ThreadTuner


def run_steps(tuner, step_seconds, steps, batch=1, seed=0):
    """Drive the tuner through `steps` decode steps whose time on n threads is step_seconds(step, n) (+-10% noise);
    returns the count each step ran on and the total time."""
    rng = random.Random(seed)
    counts, total = [], 0.0
    for step in range(steps):
        count = tuner.choose(batch)
        seconds = step_seconds(step, count) * rng.uniform(0.9, 1.1)
        tuner.record(batch, count, seconds)
        counts.append(count)
        total += seconds
    return counts, total


IDLE = {2: 0.010, 1: 0.016}  # two threads are faster on two free cores
BUSY = {2: 0.080, 1: 0.017}  # one core taken by another process: the second thread waits on it


def test_on_an_idle_machine_the_tuner_keeps_every_core():
    counts, total = run_steps(ThreadTuner(2), lambda step, n: IDLE[n], 2000)
    assert counts[:8] == [2] * 8
    assert counts.count(2) / len(counts) > 0.985  # probes: a step every 16, 32, ... up to every 256
    assert total < 1.01 * 2000 * IDLE[2]


def test_with_a_core_taken_it_drops_a_thread_and_comes_back_when_freed():
    """Busy from step 100 to 1100: the tuner moves to one thread within a few steps, keeps well over half the
    one-thread speed meanwhile, and returns to two threads once the core is free again."""
    busy = range(100, 1100)
    counts, _ = run_steps(ThreadTuner(2), lambda step, n: (BUSY if step in busy else IDLE)[n], 2000)
    assert 1 in counts[100:120]
    assert counts[100:1100].count(1) / 1000 > 0.97
    busy_time = sum((BUSY if step in busy else IDLE)[n] for step, n in enumerate(counts) if step in busy)
    assert busy_time < 1.2 * len(busy) * BUSY[1]  # the bar: at least half the one-thread speed
    back = counts[1100 + ThreadTuner.MAX_INTERVAL + 2 * ThreadTuner.PROBE_STEPS:]
    assert back.count(2) / len(back) > 0.97


def test_a_new_batch_size_is_never_compared_with_the_old():
    """Step times of different batch sizes are not compared: probes wait for steps of the same size."""
    tuner = ThreadTuner(2)
    for step in range(40):
        batch = 8 if step % 2 else 1  # alternating sizes: never two alike in a row
        count = tuner.choose(batch)
        tuner.record(batch, count, 0.05 if batch == 8 else 0.01)
        assert count == 2
