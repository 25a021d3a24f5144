"""What a killed process leaves in Prefect: its flow runs are marked Crashed on resume, and its
temporary Prefect server does not outlive it."""
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]



def test_resume_marks_crashed_only_the_dead_processes_flow_runs_of_the_run(prefect_api, monkeypatch):
    """Flow runs of run r1 a killed process left RUNNING, or waiting to retry after they had started,
    become Crashed with the message; the resuming flow run, the flow that called it and its subflow
    (all RUNNING, all tagged run:r1), never-started runs of r1 and a RUNNING run of r2 do not. Read
    in pages of 2, so that paging past the runs it leaves alone is exercised too."""
    from prefect import flow, tags
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.runtime import flow_run
    from prefect.states import AwaitingRetry, Pending, Running, Scheduled, StateType

    from tasks import prefect_runs
    from tasks.prefect_runs import mark_crashed_flow_runs, run_tag

    monkeypatch.setattr(prefect_runs, "_PAGE", 2)

    @flow
    def killed():
        pass

    with get_client(sync_client=True) as client:
        def stale(tag, state):
            return client.create_flow_run(killed, tags=[tag, "iterative-grpo"], state=state).id

        dead_running = stale(run_tag("r1"), Running())
        dead_retrying = stale(run_tag("r1"), Running())
        client.set_flow_run_state(dead_retrying, AwaitingRetry(), force=True)
        never_started = {stale(run_tag("r1"), Scheduled()), stale(run_tag("r1"), Pending())}
        other_run = stale(run_tag("r2"), Running())

    message = "crashed: the process was killed; resumed as flow run X"

    @flow
    def resumed_subflow(resuming_flow_run_id):
        return mark_crashed_flow_runs("r1", resuming_flow_run_id, message)

    @flow
    def resuming():
        return resumed_subflow(flow_run.id)

    @flow
    def caller():
        return resuming()

    with tags(run_tag("r1")):
        assert caller() == 2

    with get_client(sync_client=True) as client:
        for dead in (dead_running, dead_retrying):
            state = client.read_flow_run(dead).state
            assert (state.type, state.message) == (StateType.CRASHED, message)
        assert client.read_flow_run(dead_retrying).start_time is not None
        assert {client.read_flow_run(i).state.type for i in never_started} == {StateType.SCHEDULED, StateType.PENDING}
        assert client.read_flow_run(other_run).state.type == StateType.RUNNING
        ours = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["caller", "resuming",
                                                                                "resumed-subflow"])))
        assert len(ours) == 3
        assert all(run.state.type == StateType.COMPLETED and run_tag("r1") in run.tags for run in ours)
    assert mark_crashed_flow_runs("r1", None, message) == 0  # nothing left RUNNING but r2's


def test_no_temporary_server_to_watch_when_an_api_url_is_set(prefect_api):
    from tasks.prefect_runs import reap_temporary_server_with_this_process

    assert reap_temporary_server_with_this_process() is None


def _processes_with_home(home):
    """PIDs of live processes whose environment has PREFECT_HOME=`home` (zombies have no environment)."""
    needle = f"PREFECT_HOME={home}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:  # gone meanwhile
                pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the watchdog needs Linux pidfds")
def test_the_temporary_server_dies_with_a_flow_process_killed_with_sigkill(tmp_path):
    """A flow script with no PREFECT_API_URL starts Prefect's temporary server; SIGKILL the script (not
    its process group) mid-flow: within seconds no process of it is left, server and watchdog included."""
    home = tmp_path / "prefect-home"
    script = (
        "import time\n"
        "from prefect import flow\n"
        "from tasks.prefect_runs import reap_temporary_server_with_this_process\n"
        "@flow\n"
        "def sleeps():\n"
        "    print('flow running', flush=True)\n"
        "    time.sleep(600)\n"
        "print('server', reap_temporary_server_with_this_process(), flush=True)\n"
        "sleeps()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # Prefect waits 20 s for its temporary server by default: too little on a loaded 2-core machine.
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True)
    try:
        lines, deadline = [], time.monotonic() + 240
        while "flow running" not in lines and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1)[0]:
                lines.append(proc.stdout.readline().strip())
        assert "flow running" in lines, f"the flow never ran: {lines}\n{stderr.read_text()[-3000:]}"
        server_pid = int(next(line for line in lines if line.startswith("server ")).split()[1])
        before = _processes_with_home(home)
        assert {proc.pid, server_pid} < before  # the scan sees the script, its server and one more: the watchdog

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = time.monotonic()
        while _processes_with_home(home) and time.monotonic() - killed_at < 15:
            time.sleep(0.2)
        left = _processes_with_home(home)
        assert not left, f"left running after the kill: {left} (server {server_pid})"
        print(f"all gone {time.monotonic() - killed_at:.1f} s after the kill")
    finally:
        for pid in _processes_with_home(home):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        proc.stdout.close()
