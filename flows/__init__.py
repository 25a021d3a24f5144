"""The pipeline's Prefect flows (usage telemetry off by default: see tasks/__init__.py)."""
import tasks  # noqa: F401
