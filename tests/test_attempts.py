"""What a run's later attempts inherit and how "needs a rerun" is counted, without a cluster: attempts are
recorded in the run directory as a local pool that ended would leave them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from hpc_rerun.atomic import atomic_write_json
from hpc_rerun.rundir import RunDir, ShardSpec, records_path
from hpc_rerun.status import status_round

from .test_runs import cli, plan_run


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def end_attempt(run_dir: Path, attempt: int, state: str) -> None:
    """As the local pool leaves an attempt whose workers exited: every shard in ``state``, pool gone."""
    plan = json.loads((run_dir / "plan.json").read_text())
    shards = plan["attempts"][attempt - 1]["shards"]
    RunDir(run_dir).attempt(attempt).record_submission("local", {}, pool_pid=dead_pid())
    atomic_write_json(run_dir / f"attempt-{attempt}" / "local-state.json",
                      {str(s["shard"]): {"state": state} for s in shards})


def answer_all(run_dir: Path, attempt: int) -> None:
    for spec_path in sorted((run_dir / f"attempt-{attempt}").glob("shard-*.json")):
        spec = ShardSpec.read(spec_path)
        with open(records_path(spec_path), "w") as out:
            for task in spec.tasks:
                out.write(json.dumps({"id": task["id"], "Prediction": "Yes", "Metrics": {},
                                      "provenance": {"config": task["config"], "attempt": attempt}}) + "\n")


def specs(run_dir: Path, attempt: int) -> list[ShardSpec]:
    return [ShardSpec.read(p) for p in sorted((run_dir / f"attempt-{attempt}").glob("shard-*.json"))]


def test_a_resubmitted_attempt_uses_exactly_the_first_attempts_generation_settings(gappy_benchmark, tiny_model_dir):
    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 2)  # planned --greedy, 4 new tokens
    first = specs(run_dir, 1)
    assert {json.dumps(s.generation.to_json(), sort_keys=True) for s in first} == {
        json.dumps({"do_sample": False, "max_new_tokens": 4}, sort_keys=True)}
    end_attempt(run_dir, 1, "FAILED")
    cli("resubmit", run_dir, "--no-submit")
    second = specs(run_dir, 2)
    assert second and all(s.generation == first[0].generation and s.token_budget == first[0].token_budget
                          for s in second)
    # Settings live in the plan: no flag can change them for one submission or one worker only.
    assert "No such option '--greedy'" in cli("submit", run_dir, "--greedy", check=False).stderr
    assert "--greedy" not in cli("worker", "--help").stdout


def test_a_shard_repaired_by_a_later_attempt_no_longer_needs_a_rerun(gappy_benchmark, tiny_model_dir):
    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 2)
    end_attempt(run_dir, 1, "FAILED")
    before = status_round(RunDir(run_dir))
    assert all(s.needs_rerun for s in before.shards) and before.totals["needs_rerun"] == 2
    cli("resubmit", run_dir, "--no-submit", "--shards", 3)
    answer_all(run_dir, 2)
    end_attempt(run_dir, 2, "COMPLETED")
    after = status_round(RunDir(run_dir)).shards
    assert [(s.attempt, s.needs_rerun) for s in after] == [(1, False), (1, False), (2, False), (2, False), (2, False)]
    shown = json.loads(cli("status", run_dir, "--json").stdout)
    assert shown["summary"]["needs_rerun"] == 0 and not any(s["needs_rerun"] for s in shown["shards"])
    assert "nothing to resubmit" in cli("resubmit", run_dir, "--no-submit").stdout


def test_resubmit_and_cancel_without_slurm_say_so(gappy_benchmark, tiny_model_dir, no_slurm_path):
    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 1)
    RunDir(run_dir).attempt(1).record_submission("slurm", {"0": "4242_0"}, {})
    env = {"HPC_RERUN_LOST_GRACE_S": "0"}
    for command in (("resubmit", run_dir), ("cancel", run_dir)):
        proc = cli(*command, check=False, env=env)
        assert proc.returncode == 3, (command, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and "not on PATH" in proc.stderr, proc.stderr
    assert "scancel" in cli("cancel", run_dir, check=False, env=env).stderr


def test_status_shows_predicted_and_actual_and_resubmit_refits_the_cost_model(gappy_benchmark, tiny_model_dir):
    run_dir = plan_run(gappy_benchmark, tiny_model_dir, 2)
    plan = json.loads((run_dir / "plan.json").read_text())
    predicted = plan["attempts"][0]["shards"][0]["cost_s"]
    spec_path = run_dir / plan["attempts"][0]["shards"][0]["spec"]
    with open(records_path(spec_path), "w") as out:  # shard 0 answered everything within 40 s
        for number, task in enumerate(ShardSpec.read(spec_path).tasks):
            end = "2026-12-01T10:00:10" if number == 0 else "2026-12-01T10:00:40"
            out.write(json.dumps({"id": task["id"], "Prediction": "Yes", "Metrics": {}, "provenance": {
                "config": task["config"], "attempt": 1, "start": "2026-12-01T10:00:00", "end": end}}) + "\n")
    end_attempt(run_dir, 1, "FAILED")
    state_file = run_dir / "attempt-1" / "local-state.json"
    states = json.loads(state_file.read_text())
    states["0"]["state"] = "COMPLETED"
    atomic_write_json(state_file, states)
    shown = json.loads(cli("status", run_dir, "--json", check=False).stdout)["shards"]
    assert shown[0]["predicted_s"] == predicted and shown[0]["actual_s"] == 40.0
    assert shown[1]["actual_s"] is None
    cli("resubmit", run_dir, "--no-submit")
    second = json.loads((run_dir / "plan.json").read_text())["attempts"][1]
    assert second["cost_scale"] == round(40.0 / predicted, 4), "re-fitted on the shard that completed"
