//! `[upstreams.<name>]` and `[namespaces.<ns>] upstream`: Temporal frontends beside the
//! default `[proxy] upstream`, and which namespace goes to which.
//!
//! A namespace bound to a named upstream is served there and only there; every other
//! namespace, and every method that names none, goes to `[proxy] upstream`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, UpstreamTlsConfig, validate_host_port};

/// One `[upstreams.<name>]` table: a Temporal frontend with its own TLS identity and API key
/// (a Temporal Cloud namespace endpoint, another cluster). The keys mean what their
/// `[proxy]` counterparts mean for the default upstream.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `host:port` of the frontend (as `proxy.upstream`).
    pub address: String,
    /// `[upstreams.<name>.tls]`: TLS toward it, the keys of `[proxy.upstream_tls]`
    /// (`enabled`, `ca_file`, `cert_file`/`key_file` for mTLS, `server_name`).
    pub tls: UpstreamTlsConfig,
    /// Environment variable holding an API key sent as `authorization: Bearer <key>` on
    /// requests to this upstream that carry no `authorization` of their own (as
    /// `proxy.api_key_env`). Must exist and be non-empty when set.
    pub api_key_env: Option<String>,
    /// Timeout for connecting (TCP and TLS), milliseconds; unset: `proxy.connect_timeout_ms`.
    pub connect_timeout_ms: Option<u64>,
}

/// Whether `name` may name an upstream: ASCII letters, digits, `-` and `_`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks `[upstreams.*]` and the `upstream` of every `[namespaces.<ns>]`.
pub(super) fn validate(config: &Config) -> Result<(), ConfigError> {
    for (name, upstream) in &config.upstreams {
        let key = |k: &str| format!("upstreams.{name}.{k}");
        if !valid_name(name) {
            return Err(ConfigError::invalid(
                format!("upstreams.{name}"),
                "an upstream's name may hold only ASCII letters, digits, '-' and '_'",
            ));
        }
        if upstream.address.is_empty() {
            return Err(ConfigError::invalid(key("address"), "required"));
        }
        validate_host_port(&key("address"), &upstream.address)?;
        upstream.tls.validate_section(&key("tls"))?;
        if matches!(&upstream.api_key_env, Some(v) if v.is_empty()) {
            return Err(ConfigError::invalid(
                key("api_key_env"),
                "must name an environment variable",
            ));
        }
        if upstream.connect_timeout_ms == Some(0) {
            return Err(ConfigError::invalid(
                key("connect_timeout_ms"),
                "must be greater than 0",
            ));
        }
    }
    for (ns, over) in &config.namespaces {
        let Some(name) = &over.upstream else {
            continue;
        };
        if !config.upstreams.contains_key(name) {
            let known: Vec<&str> = config.upstreams.keys().map(String::as_str).collect();
            return Err(ConfigError::invalid(
                format!("namespaces.{ns}.upstream"),
                format!(
                    "names upstream {name:?}, which is not in [upstreams] (configured: {}); \
                     the default upstream needs no binding",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// The namespaces bound to a named upstream, by namespace.
pub fn bindings(config: &Config) -> BTreeMap<&str, &str> {
    config
        .namespaces
        .iter()
        .filter_map(|(ns, over)| over.upstream.as_deref().map(|u| (ns.as_str(), u)))
        .collect()
}

/// The config keys of every API key configured (`proxy.api_key_env`,
/// `upstreams.<name>.api_key_env`), for the check that a listener beyond loopback that
/// calls upstreams with an API key needs `[proxy.auth]`.
pub(super) fn api_key_keys(config: &Config) -> impl Iterator<Item = String> + '_ {
    let default = config
        .proxy
        .api_key_env
        .as_ref()
        .map(|_| "proxy.api_key_env".to_owned());
    default.into_iter().chain(
        config
            .upstreams
            .iter()
            .filter(|(_, u)| u.api_key_env.is_some())
            .map(|(name, _)| format!("upstreams.{name}.api_key_env")),
    )
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Vec::new()).map_err(|e| e.to_string())
    }

    const TWO: &str = "[upstreams.cloud-a]\naddress = \"a.acct.tmprl.cloud:7233\"\napi_key_env = \"PGW_KEY_A\"\nconnect_timeout_ms = 2000\n\
                       [upstreams.cloud-a.tls]\nenabled = true\nserver_name = \"a.acct.tmprl.cloud\"\n\
                       [upstreams.self_hosted]\naddress = \"10.0.0.5:7233\"\n\
                       [namespaces.a]\nupstream = \"cloud-a\"\n\
                       [namespaces.b]\nupstream = \"self_hosted\"\n";

    #[test]
    fn upstreams_and_bindings_load() {
        let c = parse(TWO).unwrap();
        assert_eq!(c.upstreams.len(), 2);
        let a = &c.upstreams["cloud-a"];
        assert!(a.tls.enabled);
        assert_eq!(a.api_key_env.as_deref(), Some("PGW_KEY_A"));
        assert_eq!(a.connect_timeout_ms, Some(2000));
        assert_eq!(c.upstreams["self_hosted"].connect_timeout_ms, None);
        let bound: Vec<(&str, &str)> = super::bindings(&c).into_iter().collect();
        assert_eq!(bound, vec![("a", "cloud-a"), ("b", "self_hosted")]);
        // Overridable from the environment like every key.
        let c = Config::from_toml(
            TWO,
            vec![(
                "PGW__UPSTREAMS__SELF_HOSTED__ADDRESS".to_owned(),
                "10.0.0.6:7233".to_owned(),
            )],
        )
        .unwrap();
        assert_eq!(c.upstreams["self_hosted"].address, "10.0.0.6:7233");
    }

    #[test]
    fn an_unknown_upstream_name_is_refused_at_load() {
        let err =
            parse("[upstreams.one]\naddress = \"h:1\"\n[namespaces.a]\nupstream = \"onee\"\n")
                .unwrap_err();
        assert!(
            err.starts_with("namespaces.a.upstream: names upstream \"onee\", which is not in [upstreams] (configured: one)"),
            "{err}"
        );
        let err = parse("[namespaces.a]\nupstream = \"x\"\n").unwrap_err();
        assert!(err.contains("(configured: none)"), "{err}");
    }

    #[test]
    fn upstream_settings_are_checked_and_named() {
        let err = parse("[upstreams.one]\napi_key_env = \"K\"\n").unwrap_err();
        assert_eq!(err, "upstreams.one.address: required");
        let err = parse("[upstreams.one]\naddress = \"nohost\"\n").unwrap_err();
        assert!(
            err.starts_with("upstreams.one.address: invalid address"),
            "{err}"
        );
        let err = parse(
            "[upstreams.one]\naddress = \"h:1\"\n[upstreams.one.tls]\nca_file = \"/ca.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err,
            "upstreams.one.tls.ca_file: has no effect unless upstreams.one.tls.enabled = true"
        );
        let err = parse(
            "[upstreams.one]\naddress = \"h:1\"\n[upstreams.one.tls]\nenabled = true\ncert_file = \"/c.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err,
            "upstreams.one.tls.key_file: required with upstreams.one.tls.cert_file"
        );
        let err = parse("[upstreams.one]\naddress = \"h:1\"\napi_key_env = \"\"\n").unwrap_err();
        assert!(err.starts_with("upstreams.one.api_key_env"), "{err}");
        let err =
            parse("[upstreams.one]\naddress = \"h:1\"\nconnect_timeout_ms = 0\n").unwrap_err();
        assert!(err.starts_with("upstreams.one.connect_timeout_ms"), "{err}");
        let err = parse("[upstreams.\"a.b\"]\naddress = \"h:1\"\n").unwrap_err();
        assert!(err.starts_with("upstreams.a.b"), "{err}");
        let err = parse("[upstreams.one]\naddress = \"h:1\"\nadress = \"h:2\"\n").unwrap_err();
        assert!(err.contains("adress"), "{err}");
    }

    #[test]
    fn an_upstream_api_key_beyond_loopback_needs_auth() {
        let err = parse(
            "[proxy]\nlisten = \"0.0.0.0:7233\"\n[upstreams.one]\naddress = \"h:1\"\napi_key_env = \"K\"\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("proxy.auth: required: upstreams.one.api_key_env is set"),
            "{err}"
        );
        parse(
            "[proxy]\nlisten = \"0.0.0.0:7233\"\nallow_unauthenticated = true\n[upstreams.one]\naddress = \"h:1\"\napi_key_env = \"K\"\n",
        )
        .unwrap();
    }

    #[test]
    fn connection_age_needs_a_grace() {
        let c = parse("[proxy]\nmax_connection_age_ms = 30000\n").unwrap();
        assert_eq!(c.proxy.max_connection_age_ms, 30_000);
        assert_eq!(c.proxy.max_connection_age_grace_ms, 120_000);
        let err =
            parse("[proxy]\nmax_connection_age_ms = 30000\nmax_connection_age_grace_ms = 0\n")
                .unwrap_err();
        assert!(
            err.starts_with("proxy.max_connection_age_grace_ms"),
            "{err}"
        );
        // Off by default.
        assert_eq!(parse("").unwrap().proxy.max_connection_age_ms, 0);
    }
}
