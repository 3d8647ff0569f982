"""Counting the frames a consumer was due but never received (hand-checked cases)."""

import pytest

from edge_ptychonn.stream.accounting import IdTracker


def feed(tracker, ids):
    for uid in ids:
        tracker.see(uid)
    return tracker


def test_one_consumer_counts_gaps():
    t = feed(IdTracker(), [1, 2, 3, 7, 8, 10])
    assert (t.missed, t.foreign, t.restarts) == (4, 0, 0)


def test_two_consumers_runs_of_eight():
    # consumer 1 of 2 with runs of 8: due 1-8, 17-24, 33-40, ...; PvaPy's offset is (2-1)*8+1 = 9
    ids = list(range(1, 9)) + list(range(17, 21)) + list(range(23, 25)) + list(range(49, 57))
    t = feed(IdTracker(8, 9), ids)
    assert t.missed == 2 + 8 + 0  # 21, 22; the whole run 33-40; 41-48 were the sibling's
    assert t.foreign == 0


def test_a_stopped_siblings_share_arrives_as_foreign_then_all_ids_are_due():
    # 2 consumers, runs of 8: the sibling stops after 16, so 25.. comes here too
    ids = list(range(1, 9)) + list(range(17, 25)) + list(range(25, 34)) + list(range(35, 40))
    t = feed(IdTracker(8, 9), ids)
    assert t.foreign == 1  # 25 belonged to the sibling: the set changed once
    assert t.stride == 8  # past one run without a gap: every id is due now
    assert t.missed == 1  # 34 never came


def test_after_one_of_four_dies_the_survivors_pattern_is_learnt():
    # 4 consumers, runs of 8 (offset 25): consumer 1 is due 1-8, 33-40, 65-72, ...;
    # after id 96 the distributor cycles over 3 survivors: runs of 8 every 24 ids.
    ids = [u for u in range(1, 97) if (u - 1) // 8 % 4 == 0]
    ids += [u for u in range(97, 97 + 24 * 20) if (u - 97) // 8 % 3 == 0]
    t = feed(IdTracker(8, 25), ids)
    assert (t.missed, t.foreign, t.stride) == (0, 1, 24)
    # the new pattern is counted exactly: one run of the survivors' pattern lost, then 2 frames
    last = ids[-1] - 7  # the start of the last run
    more = list(range(last + 48, last + 56)) + [last + 72, last + 75]
    t = feed(t, more)
    assert t.missed == 8 + 2  # the run at last+24 and last+73, last+74


def test_a_sibling_that_joins_late_is_not_counted_as_missed_frames():
    # 2 consumers, runs of 8: this one starts alone and gets every id, the sibling joins at 41
    ids = list(range(1, 41)) + [u for u in range(41, 41 + 16 * 50) if (u - 41) // 8 % 2 == 0]
    t = feed(IdTracker(8, 9), ids)
    assert (t.missed, t.foreign, t.stride) == (0, 1, 16)
    # with the configured set whole again, a lost run counts
    t = feed(t, list(range(ids[-1] + 1 + 24, ids[-1] + 1 + 32)))
    assert t.missed == 8


def test_nothing_counts_as_missed_while_the_new_pattern_is_unknown():
    ids = list(range(1, 9)) + list(range(17, 25)) + list(range(25, 30)) + [31]
    t = feed(IdTracker(8, 9), ids)
    assert (t.foreign, t.missed, t.stride) == (1, 0, None)  # 30 may have been a sibling's


def test_restart_starts_counting_again():
    t = feed(IdTracker(), [1, 2, 3, 1, 2, 4])
    assert (t.missed, t.restarts) == (1, 1)


@pytest.mark.parametrize("n_seq, lost", [(1, [41]), (1, [41, 57, 90, 91]), (8, list(range(49, 57)))])
def test_after_a_sibling_died_lost_frames_are_not_taken_for_its_return(n_seq, lost):
    # 2 consumers; the sibling dies after id 32: from then on every id is this one's. A loss
    # that looks like the sibling coming back (a jump of whole runs) is counted once the ids
    # show the old pattern goes on.
    ids = [u for u in range(1, 33) if (u - 1) // n_seq % 2 == 0] + [u for u in range(33, 201) if u not in lost]
    t = feed(IdTracker(n_seq, n_seq + 1), ids)
    assert (t.missed, t.foreign) == (len(lost), 1)


def test_a_sibling_that_comes_back_after_dying_is_not_counted_as_missed():
    # 2 consumers, runs of 8: the sibling dies after 32, comes back at 97
    ids = [u for u in range(1, 33) if (u - 1) // 8 % 2 == 0] + list(range(33, 97))
    ids += [u for u in range(97, 97 + 16 * 10) if (u - 97) // 8 % 2 == 0]
    t = feed(IdTracker(8, 9), ids)
    assert (t.missed, t.foreign, t.stride) == (0, 1, 16)


def test_a_replacement_after_a_takeover_inside_the_dead_siblings_run_is_not_counted_as_missed():
    # 2 consumers, runs of 8: the sibling dies holding 41-45 of its run 41-48, so the
    # distributor gives this consumer 46 on (a run of its own starting there), then every id;
    # a replacement joins where the distributor is, not on the old runs' boundaries: it takes
    # 103-110, then every other run of 8
    ids = [u for u in range(1, 41) if (u - 1) // 8 % 2 == 0] + list(range(46, 103))
    ids += [u for u in range(111, 111 + 16 * 10) if (u - 111) // 8 % 2 == 0]
    t = feed(IdTracker(8, 9), ids)
    assert (t.missed, t.foreign, t.stride) == (0, 1, 16)
    t = feed(t, [u for u in range(271, 271 + 16 * 4) if (u - 271) // 8 % 2 == 0 and u != 274])
    assert t.missed == 1  # the pattern learnt from the replacement's run counts losses exactly


def test_frames_lost_before_the_first_are_no_change_of_the_set():
    # 2 consumers, runs of 8: 1-4 never reach this consumer (lost upstream, or it connected
    # in the middle of its run): its first id is 5, inside the run 1-8
    ids = list(range(5, 9)) + list(range(17, 25)) + list(range(33, 41))
    t = feed(IdTracker(8, 9), ids)
    assert (t.missed, t.foreign, t.stride) == (0, 0, 16)
    t = feed(t, list(range(65, 73)))  # 49-56 lost: counted, the pattern is known
    assert (t.missed, t.foreign) == (8, 0)


def test_frames_lost_after_a_first_id_inside_its_run_are_counted():
    # first id 5 (1-4 before it), then 7 and 8 lost: they were this consumer's
    ids = [5, 6] + list(range(17, 25)) + list(range(33, 41))
    t = feed(IdTracker(8, 9), ids)
    assert (t.missed, t.foreign) == (2, 0)


def test_a_first_run_and_a_loss_that_look_alike_are_told_apart_by_the_next_run():
    # first id 5 of the run 1-8, then 17-20 lost: 5-8, 21-24 also fit a run 5-12 with
    # 9-12 lost; either way 4 were lost, and the run at 33 shows which
    t = feed(IdTracker(8, 9), list(range(5, 9)) + list(range(21, 25)))
    assert (t.missed, t.foreign) == (4, 0)
    t = feed(t, list(range(33, 41)) + list(range(49, 57)))
    assert (t.missed, t.foreign, t.stride) == (4, 0, 16)


def test_a_consumer_that_connects_in_its_run_among_four():
    # consumer 2 of 4, runs of 8 (offset 25): due 9-16, 41-48, ...; it starts at 14
    ids = [u for u in range(14, 400) if (u - 1) // 8 % 4 == 1]
    t = feed(IdTracker(8, 25), ids)
    assert (t.missed, t.foreign, t.restarts) == (0, 0, 0)


def test_a_reset_before_the_first_runs_position_is_known_counts_only_later_losses():
    t = feed(IdTracker(8, 9), [5, 7])  # 6 lost, inside the run whatever its position
    assert t.missed == 1
    t = feed(t.counts_reset(), [8] + list(range(17, 25)))
    assert (t.missed, t.foreign) == (0, 0)
    t = feed(t, list(range(49, 57)))  # 33-40 lost after the reset
    assert (t.missed, t.foreign) == (8, 0)


def test_random_losses_in_any_pattern_from_any_first_id_are_counted_exactly():
    import random

    for trial in range(3000):
        r = random.Random(trial)
        n_consumers, n_seq = r.choice([1, 2, 3, 4]), r.choice([1, 2, 3, 8])
        k = r.randrange(n_consumers)
        due = [u for u in range(1, n_consumers * n_seq * 30) if (u - 1) // n_seq % n_consumers == k]
        due = due[r.randrange(0, 2 * n_seq + 1):]  # the first ids never arrive
        loss = r.choice([0.0, 0.05, 0.2])
        seen = [u for u in due[:-3 * n_seq] if r.random() >= loss] + due[-3 * n_seq:]
        t = feed(IdTracker(n_seq, (n_consumers - 1) * n_seq + 1), seen)
        lost = sum(1 for u in due if seen[0] <= u <= seen[-1]) - len(seen)
        assert (t.missed, t.foreign) == (lost, 0), (trial, n_consumers, n_seq, k, seen[:12])


def test_a_new_pattern_given_at_run_time_is_counted_in_from_the_next_id():
    # 2 consumers, runs of 8; two more join at 33 and PvaPy is told (objectIdOffset 25):
    # this consumer now gets 33-40, 65-72, ... and the ids between are not missed
    t = feed(IdTracker(8, 9), list(range(1, 9)) + list(range(17, 25)))
    t.set_pattern(8, 25)
    t = feed(t, [u for u in range(33, 33 + 32 * 10) if (u - 33) // 8 % 4 == 0])
    assert (t.missed, t.foreign, t.restarts) == (0, 0, 0)
    t = feed(t, list(range(33 + 32 * 11, 33 + 32 * 11 + 8)))  # one run lost
    assert t.missed == 8
