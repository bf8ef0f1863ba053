"""Fixtures for the Payload Gateway suite: a Temporal dev server, gateways, s3s-fs, a recording upstream."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rig  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a minute")
    config.addinivalue_line("markers", "gateway: needs the gateway binary")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("setup", "call") and rep.failed:
        # Attach the output of every process this test started, so a failure shows why.
        for proc in getattr(item, "_pgw_procs", []):
            try:
                rep.sections.append((f"process output: {proc.name}", proc.describe()))
            except Exception as exc:  # pragma: no cover
                rep.sections.append((f"process output: {getattr(proc, 'name', '?')}", f"<unavailable: {exc}>"))


def _attach(request, proc):
    procs = getattr(request.node, "_pgw_procs", None)
    if procs is None:
        procs = []
        request.node._pgw_procs = procs
    procs.append(proc)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pgw")


@pytest.fixture(scope="session")
def temporal_server(workdir):
    """The shared Temporal dev server (session-scoped)."""
    server = rig.TemporalServer(workdir / "temporal-shared", name="temporal-shared").start()
    yield server
    server.stop()


@pytest.fixture
def dedicated_temporal_server(workdir, request):
    """A Temporal dev server of the test's own (for tests that kill and restart it)."""
    server = rig.TemporalServer(rig.new_tmpdir(workdir, "temporal-dedicated-"), name="temporal-dedicated").start()
    _attach(request, server.proc)
    yield server
    server.stop()


@pytest.fixture
def gateway_factory(workdir, request):
    """make(upstream, config=None, extra_env=None, name=...) -> a started Gateway, stopped at teardown.
    `config` is a dict, None (forwarding only), or a function of the new Gateway returning the
    dict (for a config on the gateway's own ports: `rig.encrypting_config`)."""
    started: list[rig.Gateway] = []

    def make(upstream: str, config: dict | Callable[[rig.Gateway], dict] | None = None, extra_env: dict | None = None,
             name: str = "gateway", start: bool = True) -> rig.Gateway:
        build = config if callable(config) else None
        gw = rig.Gateway(rig.new_tmpdir(workdir, f"{name}-"), upstream, config={} if build else config, extra_env=extra_env,
                         name=name)
        if build:
            gw.configure(build(gw))
        started.append(gw)
        if start:
            try:
                gw.start()
            finally:
                if gw.proc is not None:
                    _attach(request, gw.proc)
        return gw

    yield make
    panics = []
    for gw in started:
        gw.stop()
        if gw.proc is not None and "panicked at" in gw.output():
            panics.append(gw.describe())
    if panics:
        pytest.fail("gateway panicked during the test (the process may have survived it):\n" + "\n".join(panics), pytrace=False)


@pytest.fixture
def gateway(gateway_factory, temporal_server) -> rig.Gateway:
    """A forwarding-only gateway in front of the shared Temporal dev server."""
    return gateway_factory(temporal_server.address)


@pytest.fixture
def kms_server(workdir, request):
    """moto_server (AWS KMS API) on a free port with its request recorder on."""
    kms = rig.KmsServer(rig.new_tmpdir(workdir, "kms-"))
    kms.start()
    _attach(request, kms.proc)
    yield kms
    kms.stop()


@pytest.fixture
def s3_server(workdir, request):
    """s3s-fs on a free port (access key AK, secret SK), with bucket `pgw-test` created."""
    s3 = rig.S3Server(rig.new_tmpdir(workdir, "s3-"))
    s3.make_bucket("pgw-test")
    s3.start()
    _attach(request, s3.proc)
    yield s3
    s3.stop()


@pytest.fixture
def recording_upstream():
    up = rig.RecordingUpstream().start()
    yield up
    up.stop()


def pytest_sessionfinish(session, exitstatus):
    rig.kill_all()


def pytest_report_header(config):
    gw = rig.gateway_bin()
    return [f"payload-gateway binary: {gw} ({'present' if gw.exists() else 'MISSING'})",
            f"tools: {rig.TOOLS_DIR}"]
