"""How the pipeline's tasks retry: a passing fault is tried again, a user's mistake never is."""
from __future__ import annotations

from configs import UserError


def not_a_user_error(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry unless the task failed on a `UserError` (deterministic: a
    retry would fail the same way and only delay the one-line message)."""
    try:
        state.result()
    except UserError:
        return False
    except BaseException:  # noqa: BLE001 -- any other failure may pass
        return True
    return True


RETRY = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=not_a_user_error)
