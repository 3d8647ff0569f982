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
