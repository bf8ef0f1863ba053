//! Loading, validation and environment overrides of the whole configuration.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Vec::new())
}

#[test]
fn embedded_defaults_are_valid() {
    let c = parse("").unwrap();
    assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:7233");
    assert_eq!(c.proxy.upstream, "127.0.0.1:7234");
    assert!(c.encryption.enabled);
    assert_eq!(c.storage.driver, "local");
    assert!(c.storage.enabled);
}

#[test]
fn storage_driver_settings_are_validated() {
    // Driver settings are checked by storage when the configuration is loaded for use
    // (`app::load_config`), not by `Config` itself.
    let parse =
        |text: &str| Config::from_toml_checked(text, Vec::new(), &crate::storage::check_driver);
    let err = parse("[[storage.drivers]]\nname = \"g\"\nkind = \"gcs\"\n").unwrap_err();
    assert!(err.to_string().contains("bucket"), "{err}");
    let err = parse(
        "[[storage.drivers]]\nname = \"g\"\nkind = \"gcs\"\nbucket = \"b\"\nregion = \"x\"\n",
    )
    .unwrap_err();
    assert!(err.to_string().contains("region"), "{err}");
    let err = parse("[[storage.drivers]]\nname = \"a\"\nkind = \"azure\"\naccount = \"acc\"\n")
        .unwrap_err();
    assert!(err.to_string().contains("container"), "{err}");
    let err = parse("[[storage.drivers]]\nname = \"a\"\nkind = \"azure\"\ncontainer = \"c\"\n")
        .unwrap_err();
    assert!(err.to_string().contains("account"), "{err}");
    let c = parse(
        "[storage]\ndriver = \"g\"\n[[storage.drivers]]\nname = \"g\"\nkind = \"gcs\"\nbucket = \"b\"\nread_buckets = [\"old\"]\nendpoint = \"http://127.0.0.1:1\"\nanonymous = true\ntimeout_ms = 500\n\
         [[storage.drivers]]\nname = \"a\"\nkind = \"azure\"\naccount = \"acc\"\ncontainer = \"c\"\nread_containers = [\"old\"]\nendpoint = \"http://127.0.0.1:1/acc\"\n",
    )
    .unwrap();
    assert_eq!(c.storage.drivers[0].kind, DriverKind::Gcs);
    assert_eq!(c.storage.drivers[1].kind, DriverKind::Azure);
    let err = parse("[[storage.drivers]]\nname = \"s\"\nkind = \"s3\"\n").unwrap_err();
    assert!(err.to_string().contains("bucket"), "{err}");
    let err =
        parse("[[storage.drivers]]\nname = \"s\"\nkind = \"s3\"\nbucket = \"b\"\nbukket = 1\n")
            .unwrap_err();
    assert!(err.to_string().contains("bukket"), "{err}");
    let c = parse(
        "[storage]\ndriver = \"s\"\n[[storage.drivers]]\nname = \"s\"\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:1\"\nforce_path_style = true\nmax_payload_size = 10\n",
    )
    .unwrap();
    assert_eq!(c.storage.drivers[0].kind, DriverKind::S3);
}

#[test]
fn unknown_key_is_named() {
    let err = parse("[proxy]\nlisten = \"127.0.0.1:1\"\nupstreem = \"x:1\"\n").unwrap_err();
    assert!(err.to_string().contains("upstreem"), "{err}");
}

#[test]
fn unknown_section_is_named() {
    let err = parse("[proxxy]\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
    assert!(err.to_string().contains("proxxy"), "{err}");
}

#[test]
fn invalid_listen_address_is_refused() {
    let err = parse("[proxy]\nlisten = \"localhost\"\n").unwrap_err();
    assert!(err.to_string().contains("socket address"), "{err}");
    assert!(err.to_string().contains("proxy.listen"), "{err}");
}

#[test]
fn invalid_upstream_is_named() {
    let err = parse("[proxy]\nupstream = \"nohost\"\n").unwrap_err();
    assert!(err.to_string().starts_with("proxy.upstream"), "{err}");
}

#[test]
fn active_key_must_exist() {
    let err = parse("[encryption]\nactive_key = \"k9\"\nkeys = [{ id = \"k1\", env = \"X\" }]\n")
        .unwrap_err();
    assert!(
        err.to_string().starts_with("encryption.active_key"),
        "{err}"
    );
}

#[test]
fn env_overrides_apply_typed_values() {
    let c = Config::from_toml(
        "[proxy]\nupstream = \"a:1\"\n",
        vec![
            ("PGW__PROXY__UPSTREAM".to_owned(), "b:2".to_owned()),
            ("PGW__ENCRYPTION__ENABLED".to_owned(), "false".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ],
    )
    .unwrap();
    assert_eq!(c.proxy.upstream, "b:2");
    assert!(!c.encryption.enabled);
}

#[test]
fn env_override_of_unknown_key_is_refused() {
    let err =
        Config::from_toml("", vec![("PGW__PROXY__NOPE".to_owned(), "1".to_owned())]).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[test]
fn tls_keys_are_validated_and_named() {
    let err = parse("[proxy.tls]\nkey_file = \"k.pem\"\n").unwrap_err();
    assert!(err.to_string().starts_with("proxy.tls.cert_file"), "{err}");
    let err = parse("[proxy.tls]\ncert_file = \"c.pem\"\n").unwrap_err();
    assert!(err.to_string().starts_with("proxy.tls.key_file"), "{err}");
    let err = parse("[proxy.tls]\nclient_ca_file = \"ca.pem\"\n").unwrap_err();
    assert!(err.to_string().starts_with("proxy.tls.cert_file"), "{err}");
    let err =
        parse("[proxy.tls]\ncert_file = \"c\"\nkey_file = \"k\"\nrequire_client_cert = true\n")
            .unwrap_err();
    assert!(
        err.to_string().starts_with("proxy.tls.client_ca_file"),
        "{err}"
    );
    let err = parse("[proxy.upstream_tls]\nca_file = \"ca.pem\"\n").unwrap_err();
    assert!(
        err.to_string().starts_with("proxy.upstream_tls.ca_file"),
        "{err}"
    );
    let err = parse("[proxy.upstream_tls]\nenabled = true\nkey_file = \"k\"\n").unwrap_err();
    assert!(
        err.to_string().starts_with("proxy.upstream_tls.cert_file"),
        "{err}"
    );
    let err = parse("[proxy.upstream_tls]\nenabled = true\nserver_name = \"a b\"\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("proxy.upstream_tls.server_name"),
        "{err}"
    );
    let err = parse("[proxy]\napi_key_env = \"\"\n").unwrap_err();
    assert!(err.to_string().starts_with("proxy.api_key_env"), "{err}");
    let err = parse("[proxy.tls]\ncertfile = \"c\"\n").unwrap_err();
    assert!(err.to_string().contains("certfile"), "{err}");
    let c = parse(
        "[proxy.tls]\ncert_file = \"c\"\nkey_file = \"k\"\nclient_ca_file = \"ca\"\n\
         [proxy.upstream_tls]\nenabled = true\nserver_name = \"temporal.example\"\n",
    )
    .unwrap();
    assert!(c.proxy.tls.enabled());
    assert_eq!(c.proxy.tls.handshake_timeout_ms, 10_000);
}

#[test]
fn example_config_parses() {
    let text = include_str!("../../../config.example.toml");
    parse(text).unwrap();
}

#[test]
fn envelope_keys_are_validated() {
    const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let c = parse(&format!(
        "[encryption]\nactive_key = \"kek\"\nkeys = [{{ id = \"kek\", kms = \"awskms:///{ARN}\" }}, {{ id = \"k1\", env = \"X\" }}]\ndek_rotation_s = 2\n"
    ))
    .unwrap();
    assert_eq!(c.encryption.dek_rotation_s, 2);
    assert_eq!(
        c.encryption.keys[0].kms.as_deref(),
        Some(&*format!("awskms:///{ARN}"))
    );
    let err = parse(&format!(
        "[encryption]\nactive_key = \"kek\"\nkeys = [{{ id = \"kek\", kms = \"awskms:///{ARN}\", env = \"X\" }}]\n"
    ))
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("exactly one of `file`, `env` or `kms`"),
        "{err}"
    );
    for (key, value) in [
        ("dek_rotation_s", 0),
        ("dek_cache_size", 0),
        ("kms_timeout_ms", 0),
    ] {
        let err = parse(&format!("[encryption]\n{key} = {value}\n")).unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
    }
    // An unsupported scheme is refused when the keyring is built, naming the key.
    let c = parse(
        "[encryption]\nactive_key = \"kek\"\nkeys = [{ id = \"kek\", kms = \"gcpkms://projects/p/locations/l/keyRings/r/cryptoKeys/k\" }]\n",
    )
    .unwrap();
    let err = crate::codec::PayloadCodec::from_config(&c).unwrap_err();
    assert!(
        err.to_string().contains("encryption.keys[0].kms") && err.to_string().contains("gcpkms"),
        "{err}"
    );
}
