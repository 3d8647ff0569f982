"""Counting the frames a consumer was due but never received (hand-checked cases)."""

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
    ids = list(range(1, 9)) + list(range(17, 25)) + list(range(25, 30)) + [31]
    t = feed(IdTracker(8, 9), ids)
    assert t.foreign == 1  # 25 belonged to the sibling
    assert t.missed == 1  # from then on every id is due: 30 never came


def test_restart_starts_counting_again():
    t = feed(IdTracker(), [1, 2, 3, 1, 2, 4])
    assert (t.missed, t.restarts) == (1, 1)
