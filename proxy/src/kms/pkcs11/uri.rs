//! PKCS#11 URIs (RFC 7512) naming a key-encryption key:
//! `pkcs11:token=gw;object=payments-kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/secrets/hsm-pin`.
//!
//! Path attributes select the token (`token`, `manufacturer`, `serial`, `model`, `slot-id`)
//! and the key (`object` = `CKA_LABEL`, `id` = `CKA_ID`, optional `type=secret-key`); query
//! attributes give the module (`module-path`, required) and the PIN (`pin-source`). Values are
//! percent-decoded. Anything else is refused, so a typo never selects another key silently.
//!
//! **`pin-value` is refused**: a PIN written into the key URI ends up in the configuration
//! file, its backups and every message that quotes the URI. The PIN comes from `pin-source`:
//! `file:/path` (or a bare absolute path) reads a file, `env:NAME` reads an environment variable
//! (a gateway extension; RFC 7512 leaves the form of `pin-source` open).

use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;

/// Default bound on one token operation (including waiting for a free session).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the user PIN comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file holding the PIN (one trailing newline is ignored).
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

/// A parsed `pkcs11:` key URI. Holds no secret (the PIN is only referenced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `module-path`: the PKCS#11 library to load.
    pub module_path: PathBuf,
    /// `token`: the token label.
    pub token: Option<String>,
    /// `manufacturer`: the token's manufacturer id.
    pub manufacturer: Option<String>,
    /// `serial`: the token's serial number.
    pub serial: Option<String>,
    /// `model`: the token's model.
    pub model: Option<String>,
    /// `slot-id`: the slot number.
    pub slot_id: Option<u64>,
    /// `object`: the key's `CKA_LABEL`.
    pub object: Option<String>,
    /// `id`: the key's `CKA_ID` (raw bytes).
    pub id: Option<Vec<u8>>,
    /// `pin-source`.
    pub pin_source: Option<PinSource>,
    /// `x-timeout-ms` (gateway extension): bound on one token operation.
    pub timeout: Duration,
}

impl Pkcs11Uri {
    /// Parses `uri`; the error says which attribute is wrong (never echoing a `pin-value`).
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case("pkcs11:"))
            .map(|_| &uri[7..])
            .ok_or_else(|| "not a PKCS#11 URI (expected `pkcs11:...`, RFC 7512)".to_owned())?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut out = Self {
            module_path: PathBuf::new(),
            token: None,
            manufacturer: None,
            serial: None,
            model: None,
            slot_id: None,
            object: None,
            id: None,
            pin_source: None,
            timeout: DEFAULT_TIMEOUT,
        };
        let mut module_path = None;
        let mut seen = Vec::new();
        let attrs = split_attrs(path, ';').map(|a| (a, false));
        let query_attrs = split_attrs(query, '&').map(|a| (a, true));
        for ((name, raw), in_query) in attrs.chain(query_attrs) {
            if name == "pin-value" {
                return Err(
                    "pin-value is refused: a PIN in the key URI ends up in the configuration \
                     file and in logs; use pin-source=file:/path or pin-source=env:NAME"
                        .to_owned(),
                );
            }
            if seen.contains(&name) {
                return Err(format!("attribute {name:?} is given twice"));
            }
            seen.push(name);
            let bytes = percent_decode_str(raw).collect::<Vec<u8>>();
            let text = || {
                String::from_utf8(bytes.clone())
                    .map_err(|_| format!("attribute {name:?} is not UTF-8 after percent-decoding"))
            };
            match (name, in_query) {
                ("token", false) => out.token = Some(text()?),
                ("manufacturer", false) => out.manufacturer = Some(text()?),
                ("serial", false) => out.serial = Some(text()?),
                ("model", false) => out.model = Some(text()?),
                ("slot-id", false) => {
                    out.slot_id = Some(
                        text()?
                            .parse()
                            .map_err(|_| "slot-id must be a decimal number".to_owned())?,
                    )
                }
                ("object", false) => out.object = Some(text()?),
                ("id", false) => out.id = Some(bytes),
                ("type", false) => {
                    if text()? != "secret-key" {
                        return Err(
                            "type must be secret-key (the KEK is an AES secret key)".to_owned()
                        );
                    }
                }
                ("module-path", true) => module_path = Some(PathBuf::from(text()?)),
                ("pin-source", true) => out.pin_source = Some(parse_pin_source(&text()?)?),
                ("x-timeout-ms", true) => {
                    let ms: u64 = text()?
                        .parse()
                        .ok()
                        .filter(|ms| *ms > 0)
                        .ok_or_else(|| "x-timeout-ms must be a positive integer".to_owned())?;
                    out.timeout = Duration::from_millis(ms);
                }
                ("module-name", true) => {
                    return Err(
                        "module-name is not supported; give the library with module-path"
                            .to_owned(),
                    );
                }
                (name, false) => {
                    return Err(format!(
                        "path attribute {name:?} is not supported (supported: token, \
                         manufacturer, serial, model, slot-id, object, id, type)"
                    ));
                }
                (name, true) => {
                    return Err(format!(
                        "query attribute {name:?} is not supported (supported: module-path, \
                         pin-source, x-timeout-ms)"
                    ));
                }
            }
        }
        out.module_path = module_path
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| "module-path is required (the PKCS#11 library to load)".to_owned())?;
        if out.object.is_none() && out.id.is_none() {
            return Err("give the key with object=<label> and/or id=<CKA_ID>".to_owned());
        }
        Ok(out)
    }

    /// A description of the token selection for messages, e.g. `token="gw"`.
    pub fn token_description(&self) -> String {
        let mut parts = Vec::new();
        if let Some(v) = &self.token {
            parts.push(format!("token={v:?}"));
        }
        if let Some(v) = &self.serial {
            parts.push(format!("serial={v:?}"));
        }
        if let Some(v) = &self.manufacturer {
            parts.push(format!("manufacturer={v:?}"));
        }
        if let Some(v) = &self.model {
            parts.push(format!("model={v:?}"));
        }
        if let Some(v) = self.slot_id {
            parts.push(format!("slot-id={v}"));
        }
        if parts.is_empty() {
            "any token".to_owned()
        } else {
            parts.join(" ")
        }
    }

    /// A description of the key selection for messages, e.g. `object="kek"`.
    pub fn object_description(&self) -> String {
        let mut parts = Vec::new();
        if let Some(v) = &self.object {
            parts.push(format!("object={v:?}"));
        }
        if let Some(v) = &self.id {
            let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
            parts.push(format!("id={hex}"));
        }
        parts.join(" ")
    }
}

/// `name=value` pairs separated by `sep`, empty segments skipped.
fn split_attrs(s: &str, sep: char) -> impl Iterator<Item = (&str, &str)> {
    s.split(sep)
        .filter(|a| !a.is_empty())
        .map(|a| a.split_once('=').unwrap_or((a, "")))
}

fn parse_pin_source(value: &str) -> Result<PinSource, String> {
    if let Some(var) = value.strip_prefix("env:") {
        if var.is_empty() {
            return Err("pin-source=env: needs a variable name".to_owned());
        }
        return Ok(PinSource::Env(var.to_owned()));
    }
    let path = value.strip_prefix("file:").unwrap_or(value);
    // `file:///path` and `file:/path` both name `/path`.
    let path = path.strip_prefix("//").unwrap_or(path);
    if !path.starts_with('/') {
        return Err(format!(
            "pin-source {value:?} must be file:/absolute/path or env:NAME"
        ));
    }
    Ok(PinSource::File(PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_uri() {
        let uri = Pkcs11Uri::parse(
            "pkcs11:token=gate%20way;object=kek;id=%01%ff;type=secret-key;slot-id=3\
             ?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin&x-timeout-ms=250",
        )
        .unwrap();
        assert_eq!(uri.token.as_deref(), Some("gate way"));
        assert_eq!(uri.object.as_deref(), Some("kek"));
        assert_eq!(uri.id.as_deref(), Some(&[1u8, 255][..]));
        assert_eq!(uri.slot_id, Some(3));
        assert_eq!(
            uri.module_path,
            PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(uri.pin_source, Some(PinSource::File("/run/pin".into())));
        assert_eq!(uri.timeout, Duration::from_millis(250));
        assert_eq!(uri.object_description(), "object=\"kek\" id=01ff");
    }

    #[test]
    fn pin_sources() {
        let parse = |s: &str| {
            Pkcs11Uri::parse(&format!("pkcs11:object=k?module-path=/m.so&pin-source={s}"))
                .map(|u| u.pin_source.unwrap())
        };
        assert_eq!(
            parse("env:HSM_PIN").unwrap(),
            PinSource::Env("HSM_PIN".into())
        );
        assert_eq!(parse("/p").unwrap(), PinSource::File("/p".into()));
        assert_eq!(parse("file:///p").unwrap(), PinSource::File("/p".into()));
        assert!(parse("relative").unwrap_err().contains("file:/absolute"));
        assert!(parse("env:").is_err());
    }

    #[test]
    fn refuses_pin_value_without_echoing_it() {
        let err =
            Pkcs11Uri::parse("pkcs11:object=k?module-path=/m.so&pin-value=hunter2").unwrap_err();
        assert!(err.contains("pin-value is refused"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (uri, needle) in [
            ("pkcs11:object=k", "module-path is required"),
            ("pkcs11:token=t?module-path=/m.so", "object=<label>"),
            ("pkcs11:object=k;objekt=x?module-path=/m.so", "\"objekt\""),
            ("pkcs11:object=k;object=j?module-path=/m.so", "twice"),
            (
                "pkcs11:object=k;type=private?module-path=/m.so",
                "secret-key",
            ),
            ("pkcs11:object=k?module-name=softhsm2", "module-name"),
            (
                "pkcs11:object=k?module-path=/m.so&x-timeout-ms=0",
                "x-timeout-ms",
            ),
            ("awskms:///arn", "not a PKCS#11 URI"),
        ] {
            let err = Pkcs11Uri::parse(uri).unwrap_err();
            assert!(err.contains(needle), "{uri}: {err}");
        }
    }
}
