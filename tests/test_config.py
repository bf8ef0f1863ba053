"""A bad configuration makes the gateway exit non-zero at start, naming the offending key on stderr."""

from __future__ import annotations

import pytest

import rig


def base(tmp_ports=True) -> dict:
    return rig.forwarding_config("127.0.0.1:1", rig.free_port(), rig.free_port(), rig.free_port())


def run(config: dict | str, workdir, extra_env=None):
    text = config if isinstance(config, str) else rig.render_toml(config)
    res = rig.run_gateway_once(text, workdir, extra_env=extra_env)
    shown = f"config:\n{text}\nexit: {res.returncode}\nstderr:\n{res.stderr}\nstdout:\n{res.stdout}"
    assert res.returncode is not None, f"gateway did not exit within the timeout on a bad config\n{shown}"
    assert res.returncode != 0, f"gateway exited 0 on a bad config\n{shown}"
    return res, shown


@pytest.fixture
def cfgdir(tmp_path):
    return tmp_path


def test_unknown_key(cfgdir):
    cfg = base()
    cfg["proxy"]["upstrem"] = "127.0.0.1:7234"
    res, shown = run(cfg, cfgdir)
    assert "upstrem" in res.stderr, shown


def test_unknown_key_in_other_section(cfgdir):
    cfg = base()
    cfg["compression"]["level_of_detail"] = 3
    res, shown = run(cfg, cfgdir)
    assert "level_of_detail" in res.stderr, shown


def test_unknown_section(cfgdir):
    cfg = base()
    cfg["bogus_section"] = {"x": 1}
    res, shown = run(cfg, cfgdir)
    assert "bogus_section" in res.stderr, shown


@pytest.mark.parametrize("key,value", [
    ("upstream", "not an address"),
    ("listen", "127.0.0.1:99999"),
])
def test_invalid_address(cfgdir, key, value):
    cfg = base()
    cfg["proxy"][key] = value
    res, shown = run(cfg, cfgdir)
    assert key in res.stderr, f"stderr does not name the key `proxy.{key}`\n{shown}"


def test_invalid_address_from_env_override(cfgdir):
    res, shown = run(base(), cfgdir, extra_env={"PGW__PROXY__UPSTREAM": "nowhere:port"})
    assert "upstream" in res.stderr.lower(), shown


def test_invalid_admin_address(cfgdir):
    cfg = base()
    cfg["admin"]["listen"] = "localhost-ish"
    res, shown = run(cfg, cfgdir)
    assert "listen" in res.stderr and "admin" in res.stderr, f"stderr does not name the key `admin.listen`\n{shown}"


def test_missing_key_file(cfgdir):
    cfg = base()
    cfg["encryption"] = {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "file": str(cfgdir / "nope.key")}]}
    res, shown = run(cfg, cfgdir)
    assert "nope.key" in res.stderr, shown


def test_malformed_key(cfgdir):
    keyfile = cfgdir / "short.key"
    keyfile.write_bytes(b"12345")  # 5 bytes: neither 32 raw bytes nor base64 of 32 bytes
    cfg = base()
    cfg["encryption"] = {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "file": str(keyfile)}]}
    res, shown = run(cfg, cfgdir)
    # Named by file, by key id or by config key (`encryption.keys[0]`).
    assert any(name in res.stderr for name in ("short.key", "k1", "encryption.keys")), shown


def test_unparseable_toml(cfgdir):
    res, shown = run("[proxy\nlisten = ", cfgdir)
    assert res.stderr.strip(), shown


def test_missing_config_file(cfgdir):
    res = rig.run_gateway_once(None, cfgdir, args=["--config", str(cfgdir / "absent.toml")])
    assert res.returncode not in (None, 0), res
    assert "absent.toml" in res.stderr, res.stderr
