//! JWKS/JWT rules, the authorizer's decisions and the namespace a request acts on.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::Engine;
use http::{HeaderMap, HeaderValue};

use super::jwks::{Jwks, JwksSettings, JwksSource, JwtError, JwtVerifier};
use super::layer::{Authorizer, Caller};
use super::*;
use crate::config::{AuthConfig, AuthTokenConfig};
use crate::grpc::Code;
use crate::ingress::Target;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const ISS: &str = "https://idp.example";
const AUD: &str = "payload-gateway";

/// A signing key of one of the three accepted kinds, and its public JWK.
enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

impl Signer {
    fn rsa() -> Self {
        Signer::Rsa(RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap())
    }
    fn ec() -> Self {
        Signer::Ec(EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap())
    }
    fn ed() -> Self {
        Signer::Ed(Ed25519KeyPair::generate().unwrap())
    }

    fn alg(&self) -> &'static str {
        match self {
            Signer::Rsa(_) => "RS256",
            Signer::Ec(_) => "ES256",
            Signer::Ed(_) => "EdDSA",
        }
    }

    fn jwk(&self, kid: &str) -> serde_json::Value {
        match self {
            Signer::Rsa(k) => {
                let c: aws_lc_rs::rsa::PublicKeyComponents<Vec<u8>> = k.public_key().into();
                serde_json::json!({"kty":"RSA","kid":kid,"n":B64.encode(&c.n),"e":B64.encode(&c.e)})
            }
            Signer::Ec(k) => {
                let p = k.public_key().as_ref();
                serde_json::json!({"kty":"EC","crv":"P-256","kid":kid,
                    "x":B64.encode(&p[1..33]),"y":B64.encode(&p[33..65])})
            }
            Signer::Ed(k) => serde_json::json!({"kty":"OKP","crv":"Ed25519","kid":kid,
                "x":B64.encode(k.public_key().as_ref())}),
        }
    }

    fn sign(&self, kid: Option<&str>, claims: &serde_json::Value) -> String {
        let mut header = serde_json::json!({"alg": self.alg(), "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = match self {
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    input.as_bytes(),
                    &mut sig,
                )
                .unwrap();
                sig
            }
            Signer::Ec(k) => k
                .sign(&SystemRandom::new(), input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            Signer::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", B64.encode(sig))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> serde_json::Value {
    serde_json::json!({"iss": ISS, "aud": AUD, "exp": now() + 600, "namespaces": ["a"]})
}

fn write_jwks(path: &std::path::Path, keys: &[serde_json::Value]) {
    std::fs::write(path, serde_json::json!({ "keys": keys }).to_string()).unwrap();
}

fn verifier(path: &std::path::Path, min_refresh: Duration) -> JwtVerifier {
    let mut settings = JwksSettings::new("test.", Some(path), None, None)
        .unwrap()
        .unwrap();
    settings.min_refresh = min_refresh;
    JwtVerifier::new(Jwks::new(settings).unwrap(), ISS, AUD)
}

#[tokio::test]
async fn rsa_ec_and_ed25519_tokens_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let signers = [
        ("r", Signer::rsa()),
        ("e", Signer::ec()),
        ("d", Signer::ed()),
    ];
    let jwks: Vec<_> = signers.iter().map(|(kid, s)| s.jwk(kid)).collect();
    write_jwks(&path, &jwks);
    let v = verifier(&path, Duration::from_secs(30));
    for (kid, s) in &signers {
        let claims = v.verify(&s.sign(Some(kid), &claims())).await;
        assert_eq!(claims.unwrap()["namespaces"][0], "a", "{}", s.alg());
    }
}

#[tokio::test]
async fn each_bad_token_is_refused_naming_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let rsa = Signer::rsa();
    write_jwks(&path, &[rsa.jwk("k1")]);
    let v = verifier(&path, Duration::from_secs(30));
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims();
        f(&mut c);
        rsa.sign(Some("k1"), &c)
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            with(&|c| c["exp"] = (now() - 3600).into()),
            "ExpiredSignature",
        ),
        (
            "not yet valid",
            with(&|c| c["nbf"] = (now() + 3600).into()),
            "ImmatureSignature",
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = "other".into()),
            "InvalidAudience",
        ),
        (
            "wrong issuer",
            with(&|c| c["iss"] = "https://evil".into()),
            "InvalidIssuer",
        ),
        (
            "no exp",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            "exp",
        ),
        (
            "no aud",
            with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            "aud",
        ),
        (
            "no iss",
            with(&|c| {
                c.as_object_mut().unwrap().remove("iss");
            }),
            "iss",
        ),
        (
            "nbf not a date",
            with(&|c| c["nbf"] = "tomorrow".into()),
            "nbf",
        ),
    ];
    for (what, token, expect) in cases {
        let err = v.verify(&token).await.unwrap_err();
        assert!(matches!(err, JwtError::Rejected(_)), "{what}: {err:?}");
        assert!(err.to_string().contains(expect), "{what}: {err}");
    }
    // Within the leeway: accepted.
    let skewed = with(&|c| c["nbf"] = (now() + super::jwks::JWT_LEEWAY_SECS / 2).into());
    v.verify(&skewed).await.unwrap();
    // A signature by another key under the same kid.
    let forged = Signer::rsa().sign(Some("k1"), &claims());
    assert!(matches!(
        v.verify(&forged).await,
        Err(JwtError::Rejected(_))
    ));
    // Tampered claims.
    let good = rsa.sign(Some("k1"), &claims());
    let mut parts: Vec<&str> = good.split('.').collect();
    let other = B64.encode(
        serde_json::json!({"iss":ISS,"aud":AUD,"exp":now()+600,"namespaces":["*"]}).to_string(),
    );
    parts[1] = &other;
    assert!(matches!(
        v.verify(&parts.join(".")).await,
        Err(JwtError::Rejected(_))
    ));
}

#[tokio::test]
async fn alg_none_and_hmac_with_the_public_key_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let rsa = Signer::rsa();
    let jwk = rsa.jwk("k1");
    write_jwks(&path, std::slice::from_ref(&jwk));
    let v = verifier(&path, Duration::from_secs(30));
    let body = B64.encode(claims().to_string());
    for alg in ["none", "None", "NONE"] {
        let header = B64.encode(format!(r#"{{"alg":"{alg}","kid":"k1"}}"#));
        for token in [format!("{header}.{body}."), format!("{header}.{body}.c2ln")] {
            let err = v.verify(&token).await.unwrap_err();
            assert!(
                matches!(err, JwtError::RefusedAlgorithm(_)),
                "{alg}: {err:?}"
            );
        }
    }
    // The classic forgery: HS256 keyed with the published public key.
    for alg in ["HS256", "HS384", "HS512"] {
        let header = B64.encode(format!(r#"{{"alg":"{alg}","kid":"k1"}}"#));
        let input = format!("{header}.{body}");
        let key =
            aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, jwk.to_string().as_bytes());
        let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        let token = format!("{input}.{}", B64.encode(tag.as_ref()));
        let err = v.verify(&token).await.unwrap_err();
        assert!(
            matches!(err, JwtError::RefusedAlgorithm(_)),
            "{alg}: {err:?}"
        );
        assert!(err.to_string().contains(alg), "{err}");
    }
    // The right algorithm family but not the key's: refused.
    let header = B64.encode(r#"{"alg":"ES256","kid":"k1"}"#);
    let err = v
        .verify(&format!("{header}.{body}.c2ln"))
        .await
        .unwrap_err();
    assert!(matches!(err, JwtError::NoKey { .. }), "{err:?}");
}

#[tokio::test]
async fn tokens_without_kid_need_a_set_of_exactly_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let ed = Signer::ed();
    write_jwks(&path, &[ed.jwk("only")]);
    let v = verifier(&path, Duration::from_secs(30));
    v.verify(&ed.sign(None, &claims())).await.unwrap();

    let path2 = dir.path().join("jwks2.json");
    write_jwks(&path2, &[ed.jwk("one"), Signer::ed().jwk("two")]);
    let v = verifier(&path2, Duration::from_secs(30));
    let err = v.verify(&ed.sign(None, &claims())).await.unwrap_err();
    assert_eq!(err, JwtError::NoKid(2));
    v.verify(&ed.sign(Some("one"), &claims())).await.unwrap();
}

#[tokio::test]
async fn unknown_kid_refreshes_at_most_every_min_refresh_and_failures_keep_the_last_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let old = Signer::ec();
    let new = Signer::ec();
    write_jwks(&path, &[old.jwk("old")]);
    let v = verifier(&path, Duration::from_millis(400));
    v.verify(&old.sign(Some("old"), &claims())).await.unwrap();

    // Rotated on disk: the unknown kid is fetched on demand, but not within min_refresh of
    // the last fetch (the load at construction).
    write_jwks(&path, &[old.jwk("old"), new.jwk("new")]);
    let token = new.sign(Some("new"), &claims());
    assert!(matches!(
        v.verify(&token).await,
        Err(JwtError::NoKey { .. })
    ));
    tokio::time::sleep(Duration::from_millis(450)).await;
    v.verify(&token).await.unwrap();

    // A broken document keeps the last good set.
    std::fs::write(&path, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(!v.jwks().refresh().await);
    assert_eq!(v.jwks().key_count(), Some(2));
    v.verify(&token).await.unwrap();
    // So does a missing file, and a set without usable keys.
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(!v.jwks().refresh().await);
    write_jwks(
        &path,
        &[serde_json::json!({"kty":"EC","crv":"P-521","x":"AA","y":"AA"})],
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(!v.jwks().refresh().await);
    v.verify(&old.sign(Some("old"), &claims())).await.unwrap();
}

#[test]
fn a_symmetric_key_refuses_the_set_and_enc_keys_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    write_jwks(
        &path,
        &[serde_json::json!({"kty":"oct","k":"c2VjcmV0","kid":"s"})],
    );
    let settings = JwksSettings::new("t.", Some(&path), None, None)
        .unwrap()
        .unwrap();
    let err = Jwks::new(settings).unwrap_err().to_string();
    assert!(err.contains("symmetric"), "{err}");

    let mut enc = Signer::rsa().jwk("e");
    enc["use"] = "enc".into();
    write_jwks(&path, &[enc, Signer::ed().jwk("s")]);
    let settings = JwksSettings::new("t.", Some(&path), None, None)
        .unwrap()
        .unwrap();
    assert_eq!(Jwks::new(settings).unwrap().key_count(), Some(1));
}

#[tokio::test]
async fn an_unreachable_url_is_not_loaded_and_says_so() {
    // Nothing listens on port 9 of loopback: the fetch fails, no set is loaded, tokens are
    // refused naming the URL.
    let mut settings = JwksSettings::new("t.", None, Some("https://127.0.0.1:9/jwks"), None)
        .unwrap()
        .unwrap();
    settings.min_refresh = Duration::ZERO;
    let jwks = Jwks::new(settings).unwrap();
    assert!(matches!(jwks.source(), JwksSource::Url(_)));
    let v = JwtVerifier::new(jwks, ISS, AUD);
    let err = v
        .verify(&Signer::ed().sign(Some("k"), &claims()))
        .await
        .unwrap_err();
    assert!(matches!(err, JwtError::NotLoaded { .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
}

#[test]
fn grants_from_claims_and_lists() {
    let c = serde_json::json!({"ns": ["a", "b"], "s": "a b,c", "all": ["x", "*"], "n": 5});
    assert_eq!(
        grant_from_claim(&c, "ns").unwrap(),
        Grant::Namespaces(["a".into(), "b".into()].into())
    );
    assert!(grant_from_claim(&c, "s").unwrap().permits("c"));
    assert_eq!(grant_from_claim(&c, "all").unwrap(), Grant::All);
    assert!(grant_from_claim(&c, "n").unwrap_err().contains("\"n\""));
    assert!(grant_from_claim(&c, "missing").is_err());
    let a = Grant::from_list(&["a"]);
    assert!(a.permits("a") && !a.permits("b") && !a.permits(""));
    assert!(a.clone().union(Grant::from_list(&["b"])).permits("b"));
    assert_eq!(a.union(Grant::All), Grant::All);
}

// ------------------------------------------------------------------ the authorizer

fn authorizer(jwt_path: Option<&std::path::Path>) -> Authorizer {
    let config = AuthConfig {
        tokens: vec![
            AuthTokenConfig {
                env: "TOK_A".into(),
                namespaces: vec!["a".into()],
            },
            AuthTokenConfig {
                env: "TOK_ADMIN".into(),
                namespaces: vec!["*".into()],
            },
        ],
        jwt: jwt_path.map(|p| crate::config::AuthJwtConfig {
            jwks_file: Some(p.to_owned()),
            issuer: ISS.into(),
            audience: AUD.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Authorizer::from_config(&config, |var| match var {
        "TOK_A" => Some("secret-a, secret-a2".into()),
        "TOK_ADMIN" => Some("secret-admin".into()),
        _ => None,
    })
    .unwrap()
}

fn headers(auth: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for a in auth {
        h.append("authorization", HeaderValue::from_str(a).unwrap());
    }
    h
}

#[tokio::test]
async fn the_authorizer_authenticates_and_never_echoes_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let ed = Signer::ed();
    write_jwks(&path, &[ed.jwk("k")]);
    let auth = authorizer(Some(&path));

    let a = auth
        .authenticate(&headers(&["Bearer secret-a2"]), None)
        .await
        .unwrap();
    assert_eq!(
        a,
        Caller {
            grant: Grant::from_list(&["a"]),
            credential: "token"
        }
    );
    let admin = auth
        .authenticate(&headers(&["secret-admin"]), None)
        .await
        .unwrap();
    assert_eq!(admin.grant, Grant::All);
    let jwt = ed.sign(Some("k"), &claims());
    let j = auth
        .authenticate(&headers(&[&format!("Bearer {jwt}")]), None)
        .await
        .unwrap();
    assert_eq!(
        j,
        Caller {
            grant: Grant::from_list(&["a"]),
            credential: "jwt"
        }
    );

    let no_claim = ed.sign(
        Some("k"),
        &serde_json::json!({"iss":ISS,"aud":AUD,"exp":now()+60}),
    );
    for (presented, what) in [
        (vec![], "authentication required"),
        (
            vec!["Bearer secret-zzz-guess"],
            "not one the gateway accepts",
        ),
        (
            vec!["Bearer secret-a", "Bearer secret-admin"],
            "more than one",
        ),
        (vec![no_claim.as_str()], "\"namespaces\" claim"),
    ] {
        let d = auth
            .authenticate(&headers(&presented), None)
            .await
            .unwrap_err();
        assert_eq!(d.status.code, Code::Unauthenticated, "{presented:?}");
        assert!(d.status.message.contains(what), "{}", d.status.message);
        for p in &presented {
            let secret = p.trim_start_matches("Bearer ");
            assert!(!d.status.message.contains(secret), "{}", d.status.message);
        }
    }
}

#[tokio::test]
async fn client_certificates_map_to_grants() {
    let config = AuthConfig {
        client_certs: vec![
            crate::config::ClientCertConfig {
                san: Some("spiffe://example/worker-a".into()),
                common_name: None,
                namespaces: vec!["a".into()],
            },
            crate::config::ClientCertConfig {
                san: None,
                common_name: Some("ops".into()),
                namespaces: vec!["*".into()],
            },
        ],
        ..Default::default()
    };
    let auth = Authorizer::from_config(&config, |_| None).unwrap();
    let worker = client_cert::ClientIdentity {
        sans: vec!["spiffe://example/worker-a".into()],
        common_names: vec!["worker".into()],
    };
    let c = auth
        .authenticate(&HeaderMap::new(), Some(&worker))
        .await
        .unwrap();
    assert_eq!(
        c,
        Caller {
            grant: Grant::from_list(&["a"]),
            credential: "client_cert"
        }
    );
    // An authorization header is not the gateway's to check when only certificates are
    // configured (it may be the client's own upstream credential).
    let c = auth
        .authenticate(&headers(&["Bearer whatever"]), Some(&worker))
        .await
        .unwrap();
    assert_eq!(c.credential, "client_cert");
    let ops = client_cert::ClientIdentity {
        sans: vec![],
        common_names: vec!["ops".into()],
    };
    assert_eq!(
        auth.authenticate(&HeaderMap::new(), Some(&ops))
            .await
            .unwrap()
            .grant,
        Grant::All
    );
    let stranger = client_cert::ClientIdentity {
        sans: vec!["dns.example".into()],
        common_names: vec![],
    };
    let d = auth
        .authenticate(&HeaderMap::new(), Some(&stranger))
        .await
        .unwrap_err();
    assert_eq!(d.status.code, Code::Unauthenticated);
    assert!(
        d.status.message.contains("\"dns.example\" is not mapped")
            || d.status.message.contains("not mapped"),
        "{}",
        d.status.message
    );
    let d = auth
        .authenticate(&HeaderMap::new(), None)
        .await
        .unwrap_err();
    assert!(
        d.status.message.contains("client certificate"),
        "{}",
        d.status.message
    );
}

#[test]
fn a_real_certificate_yields_its_names() {
    let mut params = rcgen::CertificateParams::new(vec!["worker.example".to_owned()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://example/worker-a").unwrap(),
    ));
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("10.0.0.7".parse().unwrap()));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "worker-a");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let id = client_cert::ClientIdentity::from_der(cert.der()).unwrap();
    assert_eq!(
        id.sans,
        ["worker.example", "spiffe://example/worker-a", "10.0.0.7"]
    );
    assert_eq!(id.common_names, ["worker-a"]);
    assert!(client_cert::ClientIdentity::from_der(b"not a certificate").is_none());
}

#[test]
fn authorization_checks_the_namespace_the_server_acts_on() {
    let auth = authorizer(None);
    let a = Caller {
        grant: Grant::from_list(&["a"]),
        credential: "token",
    };
    let admin = Caller {
        grant: Grant::All,
        credential: "token",
    };
    let ns = |n: &str| Target::Namespace(n.to_owned());
    assert!(auth.authorize(&a, &ns("a"), None).is_ok());
    assert!(auth.authorize(&a, &ns("a"), Some("a")).is_ok());
    assert!(auth.authorize(&a, &Target::Open, None).is_ok());
    let cases = [
        (&a, ns("b"), None, "not granted namespace \"b\""),
        (&a, ns("a"), Some("b"), "header names \"b\""),
        (&admin, ns("a"), Some("b"), "header names \"b\""),
        (&a, ns(""), None, "names no namespace"),
        (
            &a,
            Target::Global("method X names no namespace".into()),
            None,
            "every namespace",
        ),
    ];
    for (caller, target, header, expect) in cases {
        let d = auth.authorize(caller, &target, header).unwrap_err();
        assert_eq!(d.status.code, Code::PermissionDenied);
        assert!(d.status.message.contains(expect), "{}", d.status.message);
    }
    assert!(
        auth.authorize(&admin, &Target::Global("x".into()), None)
            .is_ok()
    );
    assert!(auth.authorize(&admin, &ns("anything"), None).is_ok());
}

#[test]
fn config_rules() {
    let parse = |text: &str| crate::config::Config::from_toml(text, Vec::<(String, String)>::new());
    let err = |text: &str| parse(text).unwrap_err().to_string();
    // The API key beyond loopback needs [proxy.auth] or an explicit opt-out.
    let open = "[proxy]\nlisten = \"0.0.0.0:7233\"\napi_key_env = \"K\"\n";
    assert!(
        err(open).starts_with("proxy.auth: required"),
        "{}",
        err(open)
    );
    parse(&format!("{open}allow_unauthenticated = true\n")).unwrap();
    parse("[proxy]\napi_key_env = \"K\"\n").unwrap();
    parse(&format!(
        "{open}[[proxy.auth.tokens]]\nenv = \"T\"\nnamespaces = [\"a\"]\n"
    ))
    .unwrap();
    assert!(err("[proxy.auth]\n").contains("configures no credential"));
    assert!(
        err("[[proxy.auth.tokens]]\nenv = \"T\"\nnamespaces = []\n")
            .starts_with("proxy.auth.tokens[0].namespaces")
    );
    assert!(
        err("[[proxy.auth.client_certs]]\nsan = \"x\"\nnamespaces = [\"a\"]\n")
            .starts_with("proxy.tls.client_ca_file")
    );
    let jwt = "[proxy.auth.jwt]\nissuer = \"i\"\naudience = \"a\"\n";
    assert!(err(jwt).contains("exactly one of jwks_file and jwks_url"));
    assert!(err(&format!("{jwt}jwks_url = \"http://idp/jwks\"\n")).contains("https://"));
    assert!(
        err(&format!(
            "{jwt}jwks_url = \"https://idp/jwks\"\njwks_min_refresh_secs = 0\n"
        ))
        .contains("jwks_min_refresh_secs")
    );
    parse(&format!("{jwt}jwks_url = \"https://idp/jwks\"\n")).unwrap();
    assert!(
        err(
            "[codec_server]\njwks_url = \"http://idp\"\njwt_issuer = \"i\"\njwt_audience = \"a\"\n"
        )
        .starts_with("codec_server.jwks_url")
    );
    let _ = Arc::new(());
}
