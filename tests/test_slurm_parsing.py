"""Scheduler output as recorded from sacct and squeue, parsed without a cluster (as submitit's own tests do)."""

from __future__ import annotations

import datetime as dt

import pytest

from hpc_rerun.backends.slurm import expand_job_ids, parse_states, resolve_state

NOW = dt.datetime(2026, 12, 1, 12, 0, 0)

RECORDED = [
    # (what the command printed, what the elements' states are)
    ("4242_0|COMPLETED\n4242_1|RUNNING\n4242_2|FAILED\n", {"4242_0": "COMPLETED", "4242_1": "RUNNING", "4242_2": "FAILED"}),
    ("4242_[3-5]|PENDING\n", {"4242_3": "PENDING", "4242_4": "PENDING", "4242_5": "PENDING"}),  # pending, in the record
    ("4242_[6,8-9%2]|PENDING\n", {"4242_6": "PENDING", "4242_8": "PENDING", "4242_9": "PENDING"}),  # throttled
    ("4242_1|CANCELLED by 0\n", {"4242_1": "CANCELLED"}),
    ("4242_1|NODE_FAIL\n4242_1|REQUEUED\n4242_1|RUNNING\n", {"4242_1": "RUNNING"}),  # requeued: the latest wins
    ("4242_7|\n", {"4242_7": "UNKNOWN"}),
    ("4243|TIMEOUT\n", {"4243": "TIMEOUT"}),  # a one-element "array" is a plain job
    ("4242_2|OUT_OF_MEMORY\n4242_3|PREEMPTED\n4242_4|DEADLINE\n",
     {"4242_2": "OUT_OF_MEMORY", "4242_3": "PREEMPTED", "4242_4": "DEADLINE"}),
    ("", {}),
]


@pytest.mark.parametrize("text, states", RECORDED)
def test_recorded_scheduler_output(text, states):
    assert parse_states(text) == states


def test_array_ranges():
    assert expand_job_ids("77_[0-2]") == ["77_0", "77_1", "77_2"]
    assert expand_job_ids("77_5") == ["77_5"] and expand_job_ids("77") == ["77"] and expand_job_ids("") == []


@pytest.mark.parametrize("sacct, squeue, sacct_ok, quiet_s, state", [
    ({"1_0": "PENDING"}, {"1_0": "RUNNING"}, True, 0, "RUNNING"),  # squeue is fresher than a lagging sacct
    ({"1_0": "COMPLETED"}, {}, True, 0, "COMPLETED"),
    ({}, {}, True, 10, "SUBMITTED"),  # just submitted: sacct lags
    ({"1_0": "RUNNING"}, {}, True, 10, "ENDING"),  # gone from squeue, sacct not there yet
    ({}, {}, True, 3600, "LOST"),  # in neither, silent past the grace period
    ({}, {}, False, 3600, "ENDED"),  # no accounting: only the shard file can tell
])
def test_state_resolution(sacct, squeue, sacct_ok, quiet_s, state):
    assert resolve_state("1_0", sacct, squeue, sacct_ok, NOW - dt.timedelta(seconds=quiet_s), NOW) == state


def test_an_element_submitit_stopped_requeueing_counts_as_timed_out(tmp_path):
    """What submitit leaves in ``<job>_0_result.pkl`` (its pickled outcome) when an element reached its time
    limit once more than it may requeue: Slurm says FAILED, the reason is the time limit."""
    import pickle

    from hpc_rerun.backends.slurm import timed_out_too_often

    outcomes = {"7_0": ("error", "Traceback ...\nsubmitit.core.utils.UncompletedJobError: Job not requeued because: "
                                 "timed-out too many times.\n"),
                "7_1": ("error", "Traceback ...\nValueError: broken table\n"), "7_2": ("success", {"written": 3})}
    for job, outcome in outcomes.items():
        (tmp_path / f"{job}_0_result.pkl").write_bytes(pickle.dumps(outcome))
    (tmp_path / "7_3_0_result.pkl").write_bytes(b"\x80\x04 truncated")
    assert [timed_out_too_often(tmp_path, f"7_{n}") for n in range(5)] == [True, False, False, False, False]
