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


def check_config(config: dict, workdir, extra_env=None):
    path = workdir / "check.toml"
    path.write_text(rig.render_toml(config))
    return rig.run_gateway_once(None, workdir, extra_env=extra_env, args=["check-config", str(path)])


@pytest.mark.parametrize("what", ["key file", "key variable", "tls certificate", "codec token variable", "jwks file"])
def test_check_config_reports_what_start_would(cfgdir, what):
    """check-config loads every file and variable start loads, so it fails the same way."""
    cfg = base()
    cfg["encryption"] = {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "env": "PGW_CHECK_KEY"}]}
    env = {"PGW_CHECK_KEY": "A" * 43 + "="}
    missing = None
    if what == "key file":
        cfg["encryption"]["keys"] = [{"id": "k1", "file": str(cfgdir / "absent.key")}]
        missing = "absent.key"
    elif what == "key variable":
        env = {}
        missing = "PGW_CHECK_KEY"
    elif what == "tls certificate":
        cfg["proxy"]["tls"] = {"cert_file": str(cfgdir / "absent.crt"), "key_file": str(cfgdir / "absent.pem")}
        missing = "absent.crt"
    elif what == "codec token variable":
        cfg["codec_server"]["bearer_tokens_env"] = "PGW_CHECK_ABSENT_TOKENS"
        missing = "PGW_CHECK_ABSENT_TOKENS"
    else:
        cfg["codec_server"].update({"jwks_file": str(cfgdir / "absent-jwks.json"), "jwt_issuer": "i", "jwt_audience": "a"})
        missing = "absent-jwks.json"
    ok = base()
    ok["encryption"] = {"enabled": True, "active_key": "k1", "keys": [{"id": "k1", "env": "PGW_CHECK_KEY"}]}
    good = check_config(ok, cfgdir, extra_env={"PGW_CHECK_KEY": "A" * 43 + "="})
    assert good.returncode == 0, good.stderr
    res = check_config(cfg, cfgdir, extra_env=env)
    assert res.returncode == 2, (res.returncode, res.stderr, res.stdout)
    assert missing in res.stderr, res.stderr


def test_check_config_prints_the_effective_policy_and_writes_no_dev_key(cfgdir):
    cfg = base()
    cfg["encryption"] = {"enabled": False, "dev_key_file": str(cfgdir / "dev.key")}
    cfg["namespaces"] = {"payments": {"encryption": True}, "scratch": {"compression": True}}
    res = check_config(cfg, cfgdir)
    assert res.returncode == 0, res.stderr
    assert '# payments: encrypt with key "dev"' in res.stdout, res.stdout
    assert "# scratch: NOT ENCRYPTED (exempt)" in res.stdout, res.stdout
    assert "start generates a development key" in res.stdout, res.stdout
    assert not (cfgdir / "dev.key").exists(), "check-config must not write the development key"


def test_message_limit_must_keep_rewritten_messages_framable(cfgdir):
    """A message plus its inflations (each at most max_message_bytes) must fit gRPC's 4-byte
    length prefix: limits of 2 GiB and more are refused instead of wrapping the prefix."""
    cfg = base()
    cfg["proxy"]["max_message_bytes"] = 2 * 1024 * 1024 * 1024
    res, shown = run(cfg, cfgdir)
    assert res.returncode == 2 and "proxy.max_message_bytes" in res.stderr, shown
