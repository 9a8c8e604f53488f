"""Scheduler output as recorded from sacct and squeue, parsed without a cluster (as submitit's own tests do)."""

from __future__ import annotations

import datetime as dt

import pytest

from hpc_rerun.backends.slurm import expand_job_ids, our_states, parse_rows, requeue_note, resolve_state

NOW = dt.datetime(2026, 12, 1, 12, 0, 0)
T0 = "2026-12-01T11:00:00"  # when the run's array was submitted
OURS = "hpc-rerun-run1"

RECORDED = [
    # (what sacct -P -D -X -o JobID,JobName,Submit,State / squeue -o %i|%j|%V|%T printed, the elements' states)
    (f"4242_0|{OURS}|{T0}|COMPLETED\n4242_1|{OURS}|{T0}|RUNNING\n4242_2|{OURS}|{T0}|FAILED\n",
     {"4242_0": ["COMPLETED"], "4242_1": ["RUNNING"], "4242_2": ["FAILED"]}),
    (f"4242_[3-5]|{OURS}|{T0}|PENDING\n", {"4242_3": ["PENDING"], "4242_4": ["PENDING"], "4242_5": ["PENDING"]}),
    (f"4242_[6,8-9%2]|{OURS}|{T0}|PENDING\n", {"4242_6": ["PENDING"], "4242_8": ["PENDING"], "4242_9": ["PENDING"]}),
    (f"4242_1|{OURS}|{T0}|CANCELLED by 0\n", {"4242_1": ["CANCELLED"]}),
    # requeued: every record of the element, oldest first (a requeued element is submitted again)
    (f"4242_1|{OURS}|{T0}|NODE_FAIL\n4242_1|{OURS}|2026-12-01T11:20:00|PREEMPTED\n"
     f"4242_1|{OURS}|2026-12-01T11:30:00|RUNNING\n", {"4242_1": ["NODE_FAIL", "PREEMPTED", "RUNNING"]}),
    (f"4242_7|{OURS}|{T0}|\n", {"4242_7": ["UNKNOWN"]}),
    (f"4243|{OURS}|{T0}|TIMEOUT\n", {"4243": ["TIMEOUT"]}),  # a one-element "array" is a plain job
    (f"4242_2|{OURS}|{T0}|OUT_OF_MEMORY\n4242_3|{OURS}|{T0}|PREEMPTED\n4242_4|{OURS}|{T0}|DEADLINE\n",
     {"4242_2": ["OUT_OF_MEMORY"], "4242_3": ["PREEMPTED"], "4242_4": ["DEADLINE"]}),
    # job ids reused after the cluster's state was reset: an older job of another run, a newer stranger
    (f"4242_0|hpc-rerun-older|2026-11-20T09:00:00|COMPLETED\n4242_0|{OURS}|{T0}|RUNNING\n"
     f"4242_0|interactive|2026-12-01T11:40:00|FAILED\n", {"4242_0": ["RUNNING"]}),
    (f"4242_0|{OURS}|2026-11-20T09:00:00|COMPLETED\n", {}),  # our name, but from before this run: not ours
    ("", {}),
]


@pytest.mark.parametrize("text, states", RECORDED)
def test_recorded_scheduler_output(text, states):
    assert our_states(parse_rows(text), OURS, dt.datetime.fromisoformat(T0)) == states


def test_what_came_before_an_element_run_is_noted():
    assert requeue_note(["PREEMPTED", "PENDING"], "PENDING") == "requeued 1x after: preempted"
    assert requeue_note(["REQUEUED", "PREEMPTED", "RUNNING"], "RUNNING") == "requeued 2x after: signalled, preempted"
    assert requeue_note(["PREEMPTED", "COMPLETED"], "COMPLETED") is None  # over: the state says it all
    assert requeue_note(["RUNNING"], "RUNNING") is None


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
