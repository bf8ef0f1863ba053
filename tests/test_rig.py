"""The rig's own peers: s3s-fs answers SigV4-signed requests; the gateway's admin endpoints answer."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

import pytest

import rig


def s3_client(s3, secret=None):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                        aws_secret_access_key=secret or s3.secret_key, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def test_s3s_fs_fixture_round_trip_and_checks_signatures(s3_server):
    from botocore.exceptions import ClientError

    c = s3_client(s3_server)
    c.put_object(Bucket="pgw-test", Key="v0/d/sha256/abc", Body=b"hello")
    assert c.get_object(Bucket="pgw-test", Key="v0/d/sha256/abc")["Body"].read() == b"hello"
    with pytest.raises(ClientError):
        s3_client(s3_server, secret="wrong").get_object(Bucket="pgw-test", Key="v0/d/sha256/abc")


def test_managed_process_group_is_killed(tmp_path):
    p = rig.ManagedProcess("sleeper", ["bash", "-c", "sleep 300 & sleep 300 & wait"], tmp_path / "s.log")
    time.sleep(0.3)
    assert p.alive()
    p.stop(timeout=2)
    rig.wait_until(lambda: not live_group_members(p.pid), 5, what="process group to be gone")


def live_group_members(pgid: int) -> list[int]:
    """Pids in process group `pgid` that are not zombies."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            out.append(int(entry))
    return out


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def test_gateway_admin_health_and_readiness(gateway_factory, temporal_server):
    gw = gateway_factory(temporal_server.address)
    base = f"http://127.0.0.1:{gw.admin_port}"
    rig.wait_until(lambda: rig.port_accepts(gw.admin_port), 10, what="admin listener")
    assert http_get(base + "/healthz")[0] == 200
    assert http_get(base + "/readyz")[0] == 200


def test_gateway_not_ready_without_upstream(gateway_factory):
    dead = f"127.0.0.1:{rig.free_port()}"
    gw = gateway_factory(dead)
    base = f"http://127.0.0.1:{gw.admin_port}"
    rig.wait_until(lambda: rig.port_accepts(gw.admin_port), 10, what="admin listener")
    assert http_get(base + "/healthz")[0] == 200
    assert http_get(base + "/readyz")[0] == 503


def test_gateway_exits_cleanly_on_sigterm(gateway_factory, temporal_server):
    gw = gateway_factory(temporal_server.address)
    code = gw.stop(timeout=15)
    assert code == 0, f"exit code after SIGTERM: {code}\n{gw.describe()}"
