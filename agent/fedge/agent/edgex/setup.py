"""Wires the EdgeX data path from an agent's configuration (one function, as the style asks)."""

from __future__ import annotations

from pathlib import Path

from fedge.agent.config import AgentConfig
from fedge.agent.edgex.core_data import CoreDataClient
from fedge.agent.edgex.ingest import BackfillCursor, EdgeXIngest
from fedge.agent.edgex.profile import check_task_against_profile, load_profile
from fedge.agent.sample_store import SampleStore
from fedge.protocol.config_source import ConfigError
from fedge.protocol.task import TaskSpec, parse_task_spec

SAMPLES_FILE = "samples.sqlite"
CURSOR_FILE = "edgex_cursor.json"


def read_task_file(path: Path) -> TaskSpec:
    try:
        return parse_task_spec(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read task spec {path}: {exc}") from None


def build_ingest(config: AgentConfig) -> EdgeXIngest:
    """The EdgeX ingest for this device: profile-checked task, store, bus and backfill."""
    if config.data.task_file is None:
        raise ConfigError("[data] task is required for the EdgeX data source")
    task = read_task_file(config.data.task_file)
    e = config.edgex
    limits: dict[str, tuple[float | None, float | None]] = {}
    if e.profile_file is not None:
        profile = load_profile(e.profile_file)
        check_task_against_profile(task, profile)
        limits = {r.name: (r.minimum, r.maximum) for r in profile.resources}
    token = None
    if e.token_file is not None:
        try:
            token = e.token_file.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read core-data token {e.token_file}: {exc}") from None
    core_data = CoreDataClient(e.core_data_url, token=token) if e.core_data_url else None
    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = SampleStore(config.state_dir / SAMPLES_FILE, e.store_max_samples, e.store_max_age_s)
    return EdgeXIngest(
        device=e.device,
        task=task,
        store=store,
        limits=limits,
        bus_settings=e.bus,
        prefix=e.prefix,
        core_data=core_data,
        cursor=BackfillCursor(config.state_dir / CURSOR_FILE),
    )
