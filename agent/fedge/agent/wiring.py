"""The one place a device agent is put together from its configuration.

The stages, in the order data flows through them:

    source (EdgeX bus + core-data backfill, a CSV file of readings, or a lab data set)
      -> sample builder (readings -> feature windows, ``fedge.agent.edgex.samples``)
      -> sample store (SQLite on the device, ``fedge.agent.sample_store``)
      -> trainer (LiteRT, ``fedge.agent.trainer``; loaded per global model)
      -> sealer (``fedge.agent.core.DeviceCore``: verifies manifests, seals updates)
      -> outbox (SQLite, leaves on PUBACK, ``fedge.agent.outbox``)

With ``[agent] identity_key_file`` (and its two companions) the trained delta of a secure round
goes from the core to the secure-aggregation driver (``fedge.agent.secure_agent``) instead of
the sealer; its masked messages take the same outbox. The identity is checked at start
(:func:`~fedge.agent.secure_agent.load_secure_identity`).

For EdgeX the first three live in :class:`~fedge.agent.edgex.ingest.EdgeXIngest` (its worker
thread owns the builder and the store); a CSV file (``[data] source = "csv"``) goes through the
same ingest (:class:`~fedge.agent.csv_source.CsvSource`, its worker reading the file instead of
the bus); any other source only has to give
:class:`LocalDataSource`'s methods. A source also hands the agent its live prediction windows
(``live_windows``, :mod:`fedge.agent.live`), on which the agent runs the verified global model
and publishes the predictions (``[insight]``, :mod:`fedge.agent.insight`). ``fedge agent run``
calls :func:`build_agent`; the demo, the tests and the container images do too, so there is no
second wiring to drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from nacl.public import PrivateKey

from fedge.agent.config import AgentConfig, EdgeXSettings
from fedge.agent.core import DeviceCore, DeviceIdentity
from fedge.agent.device_state import DeviceStateStore
from fedge.agent.edgex.core_data import CoreDataClient
from fedge.agent.edgex.ingest import BackfillCursor, EdgeXIngest
from fedge.agent.edgex.profile import check_task_against_profile, load_profile
from fedge.agent.error_feedback import RESIDUAL_FILE, ResidualStore
from fedge.agent.live import NO_LIVE_WINDOWS, LiveWindows
from fedge.agent.outbox import Outbox
from fedge.agent.sample_store import SampleStore
from fedge.agent.trust import TrustStore
from fedge.protocol.config_source import ConfigError
from fedge.protocol.task import TaskSpec, parse_task_spec
from fedge.shell.files import prepare_writable_dir, read_private_key
from fedge.shell.storage_faults import StorageFault, unwritable_dir_fix

if TYPE_CHECKING:  # imported when a device reads a CSV (issue 18: an EdgeX agent never does)
    from fedge.agent.csv_source import CsvSource

    # ...and these only when configured: personalisation, secure aggregation, write-back rules.
    from fedge.agent.personal import Personaliser
    from fedge.agent.secure_agent import SecureIdentity
    from fedge.agent.writeback import Writeback

SAMPLES_FILE = "samples.sqlite"
CURSOR_FILE = "edgex_cursor.json"
STATE_FILE = "state.json"
OUTBOX_FILE = "outbox.sqlite"
TRUST_FILE = "trust.json"

#: Turns the device's local readings into (features, labels) as a task spec says.
DataProvider = Callable[[TaskSpec], tuple[np.ndarray, np.ndarray]]


class LocalDataSource(Protocol):
    """Where a device's training data comes from; started before the agent connects."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def training_data(self, task: TaskSpec) -> tuple[np.ndarray, np.ndarray]: ...

    def available(self) -> int | None:
        """How many samples the source holds for its task now; None if it cannot tell before
        a round names the task."""
        ...

    def report(self) -> dict[str, Any] | None: ...

    def live_windows(self, task: TaskSpec | None) -> LiveWindows:
        """The prediction windows built since the last call (oldest first, the same features
        and windows as training) and how many were dropped meanwhile; clears them. ``task`` is
        the verified global model's (None before one), for a source that builds windows for
        whatever task it is given; a source provisioned for a task of its own ignores it.
        Called from the agent's worker thread."""
        ...


@dataclass(frozen=True)
class ProvidedData:
    """A source that is one function (a recorded data set, a test's arrays): nothing to run."""

    provider: DataProvider

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def training_data(self, task: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
        return self.provider(task)

    def available(self) -> int | None:
        return None

    def report(self) -> dict[str, Any] | None:
        return None

    def live_windows(self, task: TaskSpec | None) -> LiveWindows:
        return NO_LIVE_WINDOWS  # recorded arrays: nothing live to predict on


@dataclass(frozen=True)
class AgentStages:
    """Everything an :class:`~fedge.agent.service.AgentService` drives, built from one config."""

    config: AgentConfig
    source: LocalDataSource
    core: DeviceCore
    state: DeviceStateStore
    trust: TrustStore
    outbox: Outbox
    #: ``[[insight.writeback]]`` rules (:func:`build_writeback`); None without any.
    writeback: Writeback | None = None
    #: The device's verified identity for secure aggregation; None when not configured.
    secure: SecureIdentity | None = None
    #: Where the error-feedback residual of sparse rounds is kept; None: in memory only.
    residuals: ResidualStore | None = None
    #: ``[personalisation]``: the personal weights (loaded from the state dir); None when off.
    personal: Personaliser | None = None


def prepare_state_dir(path: Path) -> None:
    """Creates ``[agent] state_dir`` and proves the agent can write there (a probe file), so a
    wrong owner, a read-only mount or a full file system is one ConfigError line naming the fix
    now, not a SQLite traceback later. (Root writes anywhere: the probe, not the mode bits, decides.)"""
    try:
        prepare_writable_dir(path)
    except OSError as exc:
        fix = unwritable_dir_fix(exc, "agent")  # full or read-only: no ownership problem
        if fix is not None:
            raise ConfigError(f"cannot write [agent] state_dir {path}: {exc.strerror}; {fix}") from None
        raise ConfigError(
            f"cannot write [agent] state_dir {path}: {exc.strerror}; it must be a directory the agent "
            "can write: in Docker the agent runs as uid 10001, so give it the host directory mounted "
            "at the state_dir (sudo chown -R 10001:10001 HOST_DIR); under systemd, StateDirectory= does it"
        ) from None


def read_task_file(path: Path) -> TaskSpec:
    try:
        return parse_task_spec(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read task spec {path}: {exc}") from None


def build_csv_source(config: AgentConfig) -> CsvSource:
    """``[data] source = "csv"``: the device's CSV of readings through the EdgeX ingest's sample
    builder and store, with ``[edgex] profile`` (value types, limits), ``device``,
    ``store_max_samples`` and ``store_max_age_s`` as for EdgeX; the bus keys are not used."""
    if config.data.task_file is None or config.data.csv_file is None:
        raise ConfigError('[data] task and csv_file are required with source = "csv"')
    from fedge.agent.csv_source import CURSOR_FILE as CSV_CURSOR_FILE  # noqa: PLC0415 - csv source only
    from fedge.agent.csv_source import CsvCursor, CsvSource  # noqa: PLC0415

    task = read_task_file(config.data.task_file)
    e = config.edgex
    limits: dict[str, tuple[float | None, float | None]] = {}
    value_types: dict[str, str] = {}
    label_units: str | None = None
    profile_name = ""
    if e.profile_file is not None:
        profile = load_profile(e.profile_file)
        check_task_against_profile(task, profile)
        limits = {r.name: (r.minimum, r.maximum) for r in profile.resources}
        value_types = {r.name: r.value_type for r in profile.resources}
        label = task.label.resource
        label_units = next((r.units for r in profile.resources if r.name == label and r.units), None)
        profile_name = profile.name
    store = SampleStore(config.state_dir / SAMPLES_FILE, e.store_max_samples, e.store_max_age_s)
    return CsvSource(
        config.data.csv_file,
        e.device,
        task,
        store,
        limits,
        CsvCursor(config.state_dir / CSV_CURSOR_FILE, config.data.csv_file),
        value_types=value_types,
        profile_name=profile_name,
        live=config.insight.publish != "off",
        label_units=label_units,
    )


def build_edgex_source(config: AgentConfig) -> EdgeXIngest:
    """The EdgeX ingest for this device: profile-checked task, sample store, bus and backfill
    (in the state directory, which :func:`build_agent` has prepared)."""
    if config.data.task_file is None:
        raise ConfigError("[data] task is required for the EdgeX data source")
    task = read_task_file(config.data.task_file)
    e = config.edgex
    limits: dict[str, tuple[float | None, float | None]] = {}
    label_units: str | None = None
    if e.profile_file is not None:
        profile = load_profile(e.profile_file)
        check_task_against_profile(task, profile)
        limits = {r.name: (r.minimum, r.maximum) for r in profile.resources}
        label = task.label.resource
        label_units = next((r.units for r in profile.resources if r.name == label and r.units), None)
    token = read_edgex_token(e)
    core_data = CoreDataClient(e.core_data_url, token=token) if e.core_data_url else None
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
        first_backfill_s=e.first_backfill_s,
        live=config.insight.publish != "off",
        label_units=label_units,
    )


def read_edgex_token(e: EdgeXSettings) -> str | None:
    """``[edgex] token_file``'s JWT (EdgeX's secure mode), for core-data and core-command alike."""
    if e.token_file is None:
        return None
    try:
        return e.token_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read core-data token {e.token_file}: {exc}") from None


def build_writeback(config: AgentConfig) -> Writeback | None:
    """The ``[[insight.writeback]]`` rules' runner, writing through ``[edgex] core_command``
    (with ``token_file``'s JWT); None without rules. Its thread starts with the agent."""
    rules = config.insight.writeback
    url = config.edgex.core_command_url
    if not rules or url is None:
        return None
    from fedge.agent.edgex.core_command import CoreCommandClient, CoreCommandError  # noqa: PLC0415
    from fedge.agent.writeback import Writeback  # noqa: PLC0415 - rules configured

    try:
        client = CoreCommandClient(url, token=read_edgex_token(config.edgex))
    except CoreCommandError as exc:
        raise ConfigError(f"[edgex] core_command: {exc.detail}") from None
    return Writeback(rules, config.insight.stale_after_s, client.set_command)


def build_agent(config: AgentConfig, source: LocalDataSource | None = None) -> AgentStages:
    """The device's stages from its config. ``source`` None means the config's own source
    (``[data] source = "edgex"`` or ``"csv"``); lab sources (``har-watch``) are built by their
    package.

    Every problem with the config, the key, the state directory or the stored state is raised
    here (a ConfigError exits 78), before anything connects. A state file that cannot be
    written because the state directory is full or read-only is one too, naming the fix.
    """
    try:
        return _build_agent(config, source)
    except StorageFault as exc:  # the probe passed, but opening a state file needed more room
        fix = unwritable_dir_fix(exc, "agent")
        raise ConfigError(f"cannot write [agent] state_dir {config.state_dir}: {exc}; {fix}") from None


def _build_agent(config: AgentConfig, source: LocalDataSource | None) -> AgentStages:
    if source is None and config.data.source not in ("edgex", "csv"):
        raise ConfigError(f"[data] source {config.data.source!r} needs fedge's lab package to build it")
    prepare_state_dir(config.state_dir)  # the sample store, the state and the outbox live there
    if source is None:
        source = build_csv_source(config) if config.data.source == "csv" else build_edgex_source(config)
    device_key = PrivateKey(read_private_key(config.key_file, "box", what="device key"))
    # Its identity key and certificate, checked against the pinned operator keys now.
    secure = None
    if config.identity_key_file or config.identity_certificate_file or config.operator_verify_keys:
        from fedge.agent.secure_agent import load_secure_identity  # noqa: PLC0415 - configured

        secure = load_secure_identity(config)
    state = DeviceStateStore(config.state_dir / STATE_FILE)
    identity = DeviceIdentity(config.fleet, config.device_id, device_key, config.aggregator_public_key)
    core = DeviceCore(  # a corrupt state file is an error now, not a reset
        identity,
        state.load(),
        secure_aggregation=secure is not None,
        require_secure_aggregation=config.require_secure_aggregation,
    )
    residuals = ResidualStore(config.state_dir / RESIDUAL_FILE)
    core.residual = residuals.load()  # unreadable: logged, and error feedback starts from zero
    outbox = Outbox(config.state_dir / OUTBOX_FILE)
    # Pinned at provisioning, then moved only by rotations a trusted key vouches for.
    trust = TrustStore.open_or_create(
        config.state_dir / TRUST_FILE, config.fleet, config.trusted_keys.values()
    )
    personal = None
    if config.personalisation.enabled:  # an unreadable file: logged, and the next model fine-tuned again
        from fedge.agent.personal import PERSONAL_FILE, Personaliser, PersonalStore  # noqa: PLC0415

        personal = Personaliser(
            config.personalisation, PersonalStore(config.state_dir / PERSONAL_FILE), config.data.seed
        )
    return AgentStages(
        config, source, core, state, trust, outbox, build_writeback(config), secure, residuals, personal
    )
