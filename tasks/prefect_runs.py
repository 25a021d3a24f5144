"""What a killed pipeline process leaves behind in Prefect, and how the next one clears it up.

A process killed with SIGKILL runs no cleanup, so it leaves two things:
- its flow runs stay RUNNING in Prefect's database forever: `mark_crashed_flow_runs` marks them
  Crashed when the pipeline run is resumed;
- the temporary Prefect server it started (when no PREFECT_API_URL is set, Prefect starts one as a
  child process and stops it only from an atexit hook) keeps running as an orphan:
  `reap_temporary_server_with_this_process` starts that server under a watchdog that stops it when
  the process dies, however it dies.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED
from prefect.states import Crashed

logger = logging.getLogger(__name__)

# States a live process moves its flow run out of. RUNNING is always a process's; PENDING and
# SCHEDULED are too once the run has started (a flow retry waits in SCHEDULED/AwaitingRetry), but a
# never-started one may be a deployment run a worker or a schedule is about to start.
_LEFT_BY_A_PROCESS = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]
_PAGE = 200  # the most runs the server returns per request (PREFECT_SERVER_API_DEFAULT_LIMIT's default)


def run_tag(run_id: str) -> str:
    """The tag every flow run of pipeline run `run_id` carries."""
    return f"run:{run_id}"


def mark_crashed_flow_runs(run_id: str, current_flow_run_id: UUID | str | None, message: str) -> int:
    """Mark Crashed, with `message`, the flow runs of pipeline run `run_id` (tag `run:<run_id>`) that a
    dead process left RUNNING, or PENDING/SCHEDULED after they had started; returns how many.

    Call it when the run is resumed, from its flow with that flow's run id (`current_flow_run_id`,
    e.g. `prefect.runtime.flow_run.id`): the current flow run, the flow runs above it (the flow that
    called it as a subflow) and below it (its subflows) are this process's and are left alone. With
    `current_flow_run_id=None` every such flow run is marked. It assumes that no other live process
    runs `run_id`: Prefect does not record which process runs a flow run, so a flow run of another
    live process would be marked too.
    """
    current = UUID(str(current_flow_run_id)) if current_flow_run_id is not None else None
    marked, left_alone = 0, []
    with get_client(sync_client=True) as client:
        ours = {current, *_ancestors(client, current)} if current is not None else set()
        while True:  # marked runs leave the filter's results and left-alone ones are excluded: each page is new
            page = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(not_any_=left_alone),
                    tags=FlowRunFilterTags(all_=[run_tag(run_id)]),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=_LEFT_BY_A_PROCESS))),
                limit=_PAGE)
            for run in page:
                if _left_by_a_dead_process(client, run, ours, current):
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                    marked += 1
                else:
                    left_alone.append(run.id)
            if len(page) < _PAGE:
                return marked


def _left_by_a_dead_process(client: SyncPrefectClient, run: FlowRun, ours: set[UUID], current: UUID | None) -> bool:
    if run.id in ours:
        return False
    if run.state_type != StateType.RUNNING and run.start_time is None:
        return False
    return current is None or current not in _ancestors(client, run.id)  # not a subflow of ours


def _ancestors(client: SyncPrefectClient, flow_run_id: UUID) -> list[UUID]:
    """The flow runs that started `flow_run_id` as a subflow, its parent first."""
    chain = []
    parent_task_run_id = client.read_flow_run(flow_run_id).parent_task_run_id
    while parent_task_run_id is not None:
        parent = client.read_task_run(parent_task_run_id).flow_run_id
        if parent is None:
            break
        chain.append(parent)
        parent_task_run_id = client.read_flow_run(parent).parent_task_run_id
    return chain


# The watchdog: a fresh interpreter that forks and lets its parent exit at once, so it is nobody's
# child to reap and sits in a session of its own (a Ctrl-C or a kill of the owner's process group
# does not reach it). It waits on two pidfds, the owner's and the server's: if the owner dies first it
# stops the server the way Prefect's own atexit hook would (SIGTERM, SIGKILL after 5 s); if the server
# exits first (the owner stopped it) there is nothing left to do.
_WATCHDOG = """
import contextlib, os, select, signal, sys
if os.fork():
    os._exit(0)
owner, server = int(sys.argv[1]), int(sys.argv[2])
ready, _, _ = select.select([owner, server], [], [])
if server not in ready:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(server, signal.SIGTERM)
        if not select.select([server], [], [], 5)[0]:
            signal.pidfd_send_signal(server, signal.SIGKILL)
"""
_watched_servers: set[int] = set()


def reap_temporary_server_with_this_process() -> int | None:
    """Start Prefect's temporary server now, if this process would use one, under a watchdog that stops
    it when this process dies, SIGKILL included. Returns the server's PID, or None when there is no
    temporary server to watch: PREFECT_API_URL names a server (a worker's flow runs, `make ui`, the
    test harness), or the platform has no pidfds (not Linux >= 5.3; logged).

    Call it at the top of a flow script's `main()`, before the flow is called: Prefect then reuses this
    server for the flow (it keeps one per process). Calling it again, e.g. first thing in the flow
    for runs that do not come through `main()`, is harmless: the same server, one watchdog.
    """
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    if not hasattr(os, "pidfd_open"):
        logger.warning("No pidfds on this platform: Prefect's temporary server will outlive this process "
                       "if it is killed (stop it by hand, or set PREFECT_API_URL to a server you run)")
        return None
    server = SubprocessASGIServer()  # the instance get_client() uses when no API URL is set
    server.start()
    pid = server.server_process.pid
    if pid not in _watched_servers:
        _start_watchdog(pid)
        _watched_servers.add(pid)
    return pid


def _start_watchdog(server_pid: int) -> None:
    # Both pidfds are opened here, while the server is still this process's unreaped child and this
    # process is alive, so neither can name a recycled PID.
    owner_fd, server_fd = os.pidfd_open(os.getpid()), os.pidfd_open(server_pid)
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(owner_fd), str(server_fd)],
                       pass_fds=(owner_fd, server_fd), start_new_session=True, check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    finally:
        os.close(owner_fd)
        os.close(server_fd)
