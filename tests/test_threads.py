"""The decode step's thread count follows what is fastest now (a busy core), without changing output."""

import time

import pytest
import torch

from mimo_local.generate import stream
from mimo_local.loader import load_model
from mimo_local.sampling import SamplingSettings
from mimo_local.threads import ThreadTuner, tuner_for
from mimo_local.tokenizer import ChatTokenizer


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def run_steps(tuner: ThreadTuner, steps: int, seconds_at: dict[int, float]) -> list[int]:
    """Steps whose duration depends on the thread count they run with; returns those counts."""
    used = []
    for _ in range(steps):
        with tuner.step(rows=1):
            used.append(torch.get_num_threads())
            time.sleep(seconds_at[used[-1]])
    return used


def test_a_busy_core_moves_decode_to_fewer_threads_and_back(two_threads):
    tuner = ThreadTuner(2)
    idle = {2: 0.002, 1: 0.006}  # two threads win while both cores are free
    used = run_steps(tuner, 40, idle)
    assert tuner.threads == 2 and used[-10:] == [2] * 10
    assert used.count(1) <= 4  # the tries cost a few steps, no more

    busy = {2: 0.012, 1: 0.006}  # another program took a core: a shared thread stalls every barrier
    used = run_steps(tuner, 12, busy)
    assert tuner.threads == 1 and used[-4:] == [1] * 4  # noticed within a few steps, not at the next retry

    used = run_steps(tuner, 3 * ThreadTuner.RETRY_EVERY, idle)  # the program ended
    assert tuner.threads == 2 and used[-4:] == [2] * 4
    assert torch.get_num_threads() == 2  # outside a step: every thread, for prefill and the rest


def test_a_neighbour_must_win_by_the_margin(two_threads):
    """A count only a little faster than the chosen one (within the noise of a busy machine) does not
    take over: switching back and forth would cost more tries than it gains."""
    tuner = ThreadTuner(2)
    run_steps(tuner, 40, {2: 0.004, 1: 0.0038})  # one thread 5% faster
    assert tuner.threads == 2


def test_one_slow_step_before_a_try_does_not_hand_the_choice_over(two_threads):
    """A try is held against the median of the chosen count's latest steps: one outlier among them
    (an event loop, a client on the same cores) does not make the slower count look faster."""
    tuner = ThreadTuner(2)
    idle = {2: 0.004, 1: 0.006}
    used = []
    for step in range(20):
        with tuner.step(rows=1):
            used.append(torch.get_num_threads())
            time.sleep(0.03 if step == ThreadTuner.FIRST_TRY_AFTER - 1 else idle[used[-1]])
    assert 1 in used  # the first try ran right after the slow step
    assert tuner.threads == 2 and used[-4:] == [2] * 4


def test_tries_grow_rarer_while_the_choice_keeps_winning(two_threads):
    tuner = ThreadTuner(2)
    used = run_steps(tuner, 300, {2: 0.003, 1: 0.009})
    assert used[150:].count(1) <= 6  # one try (two steps), and room for a noisy machine's


def test_one_thread_is_left_alone(one_thread):
    tuner = ThreadTuner(1)
    assert run_steps(tuner, 5, {1: 0.0}) == [1] * 5 and tuner.seconds == {}


def test_greedy_output_does_not_depend_on_the_thread_count(checkpoints, two_threads):
    directory = checkpoints("mimo")
    model, tokenizer = load_model(directory), ChatTokenizer(directory)
    settings = SamplingSettings(temperature=0, max_tokens=24)
    prompt = tokenizer.encode("Hello world")

    def generate():
        return list(stream(model, tokenizer, prompt, settings, eos_ids=()))[-1].stats.token_ids

    tuner = tuner_for(model)
    tuner.RETRY_EVERY = tuner._patience = 1  # try the other count at every chance
    alternating = generate()
    assert {n for _, n in tuner.seconds} == {1, 2}
    torch.set_num_threads(1)
    assert generate() == alternating
