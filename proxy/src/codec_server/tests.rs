//! Unit tests of the codec endpoint: routing, CORS, auth, the JSON mapping and limits, over a
//! real payload codec.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

use super::json::{self, ExternalPayloadDetails, Payload};
use super::{Action, CodecServer, Route, route};
use crate::codec::PayloadCodec;
use crate::config::{CodecServerConfig, CodecTokenConfig, Config, KeySpec};
use crate::rewrite::Pipeline;

struct Fixture {
    _dir: tempfile::TempDir,
    server: CodecServer,
}

fn pipeline(dir: &std::path::Path) -> Pipeline {
    let key = dir.join("k1.key");
    std::fs::write(&key, [0x42u8; 32]).unwrap();
    let mut config = Config::default();
    config.encryption.keys = vec![KeySpec {
        id: "k1".to_owned(),
        file: Some(key),
        env: None,
    }];
    config.encryption.active_key = Some("k1".to_owned());
    Pipeline::new(Arc::new(PayloadCodec::from_config(&config).unwrap()))
}

fn fixture_with(
    edit: impl FnOnce(&mut CodecServerConfig),
    env: &'static [(&'static str, &'static str)],
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CodecServerConfig::default();
    edit(&mut config);
    let server = CodecServer::with_env(&config, Some(pipeline(dir.path())), |var| {
        env.iter()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| (*v).to_owned())
    })
    .unwrap();
    Fixture { _dir: dir, server }
}

fn fixture() -> Fixture {
    fixture_with(|_| {}, &[])
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

async fn call(
    server: &CodecServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut builder = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = server.handle(request).await;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

fn plain(text: &str) -> Payload {
    Payload {
        metadata: BTreeMap::from([
            ("encoding".to_owned(), b"json/plain".to_vec()),
            ("x-custom-key".to_owned(), vec![0, 1, 2, 255]),
        ]),
        data: Bytes::from(format!("\"{text}\"")),
        external_payloads: Vec::new(),
    }
}

fn body_of(payloads: &[Payload]) -> String {
    String::from_utf8(json::write_payloads(payloads)).unwrap()
}

fn parse(body: &str) -> Vec<Payload> {
    json::parse_payloads(body.as_bytes()).unwrap()
}

// ------------------------------------------------------------------ routing

#[test]
fn routes_match_the_last_segment() {
    let r = |p| route(p);
    assert_eq!(
        r("/encode"),
        Some(Route {
            action: Action::Encode,
            namespace: None
        })
    );
    assert_eq!(
        r("/default/decode"),
        Some(Route {
            action: Action::Decode,
            namespace: Some("default".to_owned())
        })
    );
    assert_eq!(
        r("/codec/my%2Dns/download/"),
        Some(Route {
            action: Action::Download,
            namespace: Some("my-ns".to_owned())
        })
    );
    assert_eq!(r("/"), None);
    assert_eq!(r("/decode/x"), None);
    assert_eq!(r("/decoder"), None);
}

#[tokio::test]
async fn unknown_path_is_404_and_other_methods_405() {
    let f = fixture();
    let reply = call(&f.server, "POST", "/nope", &[], "{}").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    let reply = call(&f.server, "GET", "/decode", &[], "").await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers["allow"], "POST, OPTIONS");
}

// ------------------------------------------------------------------ JSON mapping

#[test]
fn json_round_trips_metadata_and_external_payloads() {
    let p = Payload {
        metadata: BTreeMap::from([
            ("encoding".to_owned(), b"binary/plain".to_vec()),
            ("weird key ✓".to_owned(), Vec::new()),
        ]),
        data: Bytes::from_static(&[0xff, 0, 0xfe]),
        external_payloads: vec![ExternalPayloadDetails { size_bytes: 1234 }],
    };
    let text = body_of(std::slice::from_ref(&p));
    assert!(
        text.contains("\"externalPayloads\":[{\"sizeBytes\":\"1234\"}]"),
        "{text}"
    );
    assert!(text.contains("\"data\":\"/wD+\""), "{text}");
    assert_eq!(parse(&text), vec![p]);
}

#[test]
fn json_reads_proto3_variants() {
    // URL-safe unpadded base64, proto field names, number int64, nulls, unknown fields.
    let text = r#"{"payloads":[
        {"metadata":{"encoding":"anNvbi9wbGFpbg","n":null},"data":"_wD-","external_payloads":[{"size_bytes":7}],"future":1},
        {},
        null
    ],"other":true}"#;
    let got = parse(text);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].metadata["encoding"], b"json/plain");
    assert_eq!(got[0].metadata["n"], b"");
    assert_eq!(got[0].data.as_ref(), &[0xff, 0, 0xfe]);
    assert_eq!(got[0].external_payloads[0].size_bytes, 7);
    assert_eq!(got[1], Payload::default());
    assert_eq!(got[2], Payload::default());
    assert!(parse("{}").is_empty());
    assert!(parse(r#"{"payloads":null}"#).is_empty());
}

#[test]
fn json_errors_are_described() {
    for bad in [
        "not json",
        r#"{"payloads":{}}"#,
        r#"{"payloads":[{"data":"***"}]}"#,
        r#"{"payloads":[{"externalPayloads":[{"sizeBytes":"x"}]}]}"#,
    ] {
        let err = json::parse_payloads(bad.as_bytes()).unwrap_err();
        assert!(err.contains("Payloads"), "{bad}: {err}");
    }
}

#[test]
fn protobuf_form_matches_the_official_types() {
    use prost::Message;
    use temporalio_protos::temporal::api::common::v1 as pb;
    let p = plain("hi");
    let official = pb::Payload::decode(p.to_bytes()).unwrap();
    assert_eq!(official.metadata["x-custom-key"], vec![0, 1, 2, 255]);
    assert_eq!(official.data, b"\"hi\"");
    assert_eq!(Payload::from_bytes(&official.encode_to_vec()).unwrap(), p);
}

// ------------------------------------------------------------------ encode / decode

#[tokio::test]
async fn encode_then_decode_round_trips() {
    let f = fixture();
    let input = vec![plain("Ada"), plain(&"x".repeat(5000))];
    let reply = call(&f.server, "POST", "/encode", &[], &body_of(&input)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/json");
    let encoded = parse(&reply.body);
    assert_eq!(encoded.len(), 2);
    for p in &encoded {
        assert_eq!(p.metadata["encoding"], b"binary/encrypted");
        assert_eq!(p.metadata["encryption-key-id"], b"k1");
        assert!(!p.data.windows(3).any(|w| w == b"Ada"));
    }
    let reply = call(&f.server, "POST", "/default/decode", &[], &reply.body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(parse(&reply.body), input);
}

#[tokio::test]
async fn decode_leaves_foreign_payloads_unchanged() {
    let f = fixture();
    let input = vec![plain("not encrypted")];
    let reply = call(&f.server, "POST", "/decode", &[], &body_of(&input)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(parse(&reply.body), input);
}

#[tokio::test]
async fn tampered_ciphertext_is_422_naming_key_and_index() {
    let f = fixture();
    let reply = call(
        &f.server,
        "POST",
        "/encode",
        &[],
        &body_of(&[plain("a"), plain("b")]),
    )
    .await;
    let mut encoded = parse(&reply.body);
    let mut data = encoded[1].data.to_vec();
    let last = data.len() - 1;
    data[last] ^= 1;
    encoded[1].data = Bytes::from(data);
    let reply = call(&f.server, "POST", "/decode", &[], &body_of(&encoded)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.body.contains("payload 1"), "{}", reply.body);
    assert!(reply.body.contains("\"k1\""), "{}", reply.body);
    assert!(reply.body.contains("tag mismatch"), "{}", reply.body);
}

#[tokio::test]
async fn unknown_key_is_422() {
    let f = fixture();
    let mut p = plain("x");
    p.metadata = BTreeMap::from([
        ("encoding".to_owned(), b"binary/encrypted".to_vec()),
        ("encryption-key-id".to_owned(), b"gone".to_vec()),
    ]);
    p.data = Bytes::from(vec![0u8; 40]);
    let reply = call(&f.server, "POST", "/decode", &[], &body_of(&[p])).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(reply.body.contains("gone"), "{}", reply.body);
}

#[tokio::test]
async fn bad_json_is_400() {
    let f = fixture();
    let reply = call(&f.server, "POST", "/decode", &[], "{\"payloads\": [").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.contains("proto3 JSON"), "{}", reply.body);
}

#[tokio::test]
async fn conflicting_namespaces_are_400() {
    let f = fixture();
    let reply = call(
        &f.server,
        "POST",
        "/a/decode",
        &[("x-namespace", "b")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = call(
        &f.server,
        "POST",
        "/a/decode",
        &[("x-namespace", "a")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn preserve_storage_refs_keeps_references_and_download_needs_storage() {
    let f = fixture();
    let reference = Payload {
        metadata: BTreeMap::from([
            ("encoding".to_owned(), b"json/protobuf".to_vec()),
            (
                "messageType".to_owned(),
                b"temporal.api.sdk.v1.ExternalStorageReference".to_vec(),
            ),
        ]),
        data: Bytes::from_static(br#"{"claimData":{"k":"v"},"driverName":"d"}"#),
        external_payloads: vec![ExternalPayloadDetails { size_bytes: 99 }],
    };
    let encoded = call(&f.server, "POST", "/encode", &[], &body_of(&[plain("p")])).await;
    let mut both = parse(&encoded.body);
    both.push(reference.clone());
    let reply = call(
        &f.server,
        "POST",
        "/decode?preserveStorageRefs=true",
        &[],
        &body_of(&both),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(parse(&reply.body), vec![plain("p"), reference.clone()]);
    // /download accepts references only...
    let reply = call(&f.server, "POST", "/download", &[], &body_of(&[plain("p")])).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.contains("reference"), "{}", reply.body);
    // ...and cannot resolve one without storage.
    let reply = call(&f.server, "POST", "/download", &[], &body_of(&[reference])).await;
    assert!(reply.status.is_client_error() || reply.status.is_server_error());
    assert_ne!(reply.status, StatusCode::OK);
}

// ------------------------------------------------------------------ limits

#[tokio::test]
async fn oversized_body_is_413() {
    let f = fixture_with(|c| c.max_body_bytes = 100, &[]);
    let big = body_of(&[plain(&"y".repeat(200))]);
    let reply = call(&f.server, "POST", "/decode", &[], &big).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply.body.contains("max_body_bytes"), "{}", reply.body);
    // Declared length over the limit is refused before reading.
    let reply = call(
        &f.server,
        "POST",
        "/decode",
        &[("content-length", "1000")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn too_many_payloads_is_413() {
    let f = fixture_with(|c| c.max_payloads = 2, &[]);
    let reply = call(
        &f.server,
        "POST",
        "/decode",
        &[],
        &body_of(&[plain("1"), plain("2"), plain("3")]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply.body.contains("max_payloads"), "{}", reply.body);
}

#[tokio::test]
async fn slow_body_times_out() {
    let f = fixture_with(|c| c.request_timeout_ms = 100, &[]);
    let (_tx, body) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(1);
    let body = http_body_util::StreamBody::new(tokio_stream_from(body));
    let request = Request::post("/decode").body(body).unwrap();
    let response = f.server.handle(request).await;
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

// ------------------------------------------------------------------ CORS

#[tokio::test]
async fn preflight_for_allowed_origin_on_every_route() {
    let f = fixture();
    for path in ["/decode", "/encode", "/default/download", "/anything"] {
        let reply = call(
            &f.server,
            "OPTIONS",
            path,
            &[
                ("origin", "http://localhost:8233"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "content-type,x-namespace,authorization",
                ),
            ],
            "",
        )
        .await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "{path}");
        let h = &reply.headers;
        assert_eq!(h["access-control-allow-origin"], "http://localhost:8233");
        assert_eq!(h["access-control-allow-methods"], "POST");
        assert_eq!(h["access-control-allow-credentials"], "true");
        let allowed = h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase();
        for want in [
            "content-type",
            "x-namespace",
            "authorization",
            "authorization-extras",
        ] {
            assert!(
                allowed.split(", ").any(|a| a == want),
                "{want} in {allowed}"
            );
        }
    }
}

#[tokio::test]
async fn foreign_origin_gets_no_allow_headers() {
    let f = fixture();
    let reply = call(
        &f.server,
        "OPTIONS",
        "/decode",
        &[("origin", "http://evil.example")],
        "",
    )
    .await;
    assert!(reply.headers.get("access-control-allow-origin").is_none());
    assert!(
        reply
            .headers
            .get("access-control-allow-credentials")
            .is_none()
    );
    let reply = call(
        &f.server,
        "POST",
        "/decode",
        &[("origin", "http://evil.example")],
        "{}",
    )
    .await;
    assert!(reply.headers.get("access-control-allow-origin").is_none());
    // An allowed origin gets the header on actual responses, errors included.
    let reply = call(
        &f.server,
        "POST",
        "/decode",
        &[("origin", "http://127.0.0.1:8233")],
        "[",
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reply.headers["access-control-allow-origin"],
        "http://127.0.0.1:8233"
    );
}

// ------------------------------------------------------------------ auth

const TOKENS: &[(&str, &str)] = &[("ALL", "s3cret, other"), ("ORDERS", "orders-token")];

fn with_tokens() -> Fixture {
    fixture_with(
        |c| {
            c.bearer_tokens_env = Some("ALL".to_owned());
            c.tokens = vec![CodecTokenConfig {
                env: "ORDERS".to_owned(),
                namespaces: vec!["orders".to_owned()],
            }];
        },
        TOKENS,
    )
}

#[tokio::test]
async fn missing_or_wrong_token_is_401() {
    let f = with_tokens();
    let reply = call(&f.server, "POST", "/decode", &[], "{}").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(
        reply.body.contains("authorization required"),
        "{}",
        reply.body
    );
    assert!(reply.headers.contains_key("www-authenticate"));
    let reply = call(
        &f.server,
        "POST",
        "/decode",
        &[("authorization", "Bearer s3creT")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(
        !reply.body.contains("s3cre"),
        "token echoed: {}",
        reply.body
    );
    // Preflights need no token.
    let reply = call(
        &f.server,
        "OPTIONS",
        "/decode",
        &[("origin", "http://localhost:8233")],
        "",
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn bearer_and_raw_tokens_are_accepted() {
    let f = with_tokens();
    for value in ["Bearer s3cret", "bearer other", "s3cret"] {
        let reply = call(
            &f.server,
            "POST",
            "/decode",
            &[("authorization", value)],
            "{}",
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{value}: {}", reply.body);
    }
}

#[tokio::test]
async fn limited_token_is_confined_to_its_namespaces() {
    let f = with_tokens();
    let auth = [("authorization", "orders-token")];
    assert_eq!(
        call(&f.server, "POST", "/orders/decode", &auth, "{}")
            .await
            .status,
        StatusCode::OK
    );
    let with_header = [("authorization", "orders-token"), ("x-namespace", "orders")];
    assert_eq!(
        call(&f.server, "POST", "/decode", &with_header, "{}")
            .await
            .status,
        StatusCode::OK
    );
    let reply = call(&f.server, "POST", "/billing/decode", &auth, "{}").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.body.contains("billing"), "{}", reply.body);
    let reply = call(&f.server, "POST", "/decode", &auth, "{}").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
}

#[test]
fn configured_but_empty_token_variable_is_refused() {
    let config = CodecServerConfig {
        bearer_tokens_env: Some("NOT_SET".to_owned()),
        ..Default::default()
    };
    let err = CodecServer::with_env(&config, None, |_| None).unwrap_err();
    assert!(
        err.to_string().contains("codec_server.bearer_tokens_env"),
        "{err}"
    );
    assert!(err.to_string().contains("NOT_SET"), "{err}");
}

#[test]
fn config_validation_names_keys() {
    let bad = |toml: &str, key: &str| {
        let err = Config::from_toml(toml, Vec::new()).unwrap_err().to_string();
        assert!(err.contains(key), "{toml}: {err}");
    };
    bad(
        "[codec_server]\ncors_origins = [\"*\"]\n",
        "codec_server.cors_origins[0]",
    );
    bad(
        "[codec_server]\ncors_origins = [\"http://x/\"]\n",
        "codec_server.cors_origins[0]",
    );
    bad(
        "[codec_server]\nmax_payloads = 0\n",
        "codec_server.max_payloads",
    );
    bad(
        "[codec_server]\njwks_file = \"j.json\"\njwt_issuer = \"i\"\n",
        "codec_server.jwt_audience",
    );
    bad(
        "[codec_server]\njwt_issuer = \"i\"\n",
        "codec_server.jwks_file",
    );
    bad(
        "[[codec_server.tokens]]\nenv = \"X\"\nnamespaces = []\n",
        "codec_server.tokens[0].namespaces",
    );
    let ok = Config::from_toml("", Vec::new()).unwrap();
    assert!(ok.codec_server.enabled);
}

// ------------------------------------------------------------------ JWT

mod jwt {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::signature::{Ed25519KeyPair, KeyPair};

    const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    struct Issuer {
        pkcs8: Vec<u8>,
        jwks: String,
    }

    fn issuer(kid: &str) -> Issuer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap();
        let x = B64URL.encode(pair.public_key().as_ref());
        let jwks = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"{kid}","use":"sig","alg":"EdDSA"}}]}}"#
        );
        Issuer { pkcs8, jwks }
    }

    fn sign(issuer: &Issuer, kid: &str, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&issuer.pkcs8)).unwrap()
    }

    fn server(issuer: &Issuer, dir: &tempfile::TempDir, claim: Option<&str>) -> CodecServer {
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, &issuer.jwks).unwrap();
        let config = CodecServerConfig {
            jwks_file: Some(path),
            jwt_issuer: Some("https://idp.example".to_owned()),
            jwt_audience: Some("codec".to_owned()),
            jwt_namespaces_claim: claim.map(str::to_owned),
            ..Default::default()
        };
        CodecServer::with_env(&config, Some(pipeline(dir.path())), |_| None).unwrap()
    }

    fn exp() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600
    }

    #[tokio::test]
    async fn valid_jwt_is_accepted_and_others_refused() {
        let dir = tempfile::tempdir().unwrap();
        let idp = issuer("k1");
        let server = server(&idp, &dir, None);
        let good = sign(
            &idp,
            "k1",
            serde_json::json!({"iss":"https://idp.example","aud":"codec","exp":exp()}),
        );
        let bearer = format!("Bearer {good}");
        let reply = call(
            &server,
            "POST",
            "/decode",
            &[("authorization", &bearer)],
            "{}",
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);

        let cases = [
            serde_json::json!({"iss":"https://other","aud":"codec","exp":exp()}),
            serde_json::json!({"iss":"https://idp.example","aud":"else","exp":exp()}),
            serde_json::json!({"iss":"https://idp.example","aud":"codec","exp":1000}),
            serde_json::json!({"iss":"https://idp.example","aud":"codec"}),
        ];
        for claims in cases {
            let token = format!("Bearer {}", sign(&idp, "k1", claims.clone()));
            let reply = call(
                &server,
                "POST",
                "/decode",
                &[("authorization", &token)],
                "{}",
            )
            .await;
            assert_eq!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{claims}: {}",
                reply.body
            );
        }
        // Signed by another key with the same kid.
        let stranger = issuer("k1");
        let forged = sign(
            &stranger,
            "k1",
            serde_json::json!({"iss":"https://idp.example","aud":"codec","exp":exp()}),
        );
        let reply = call(
            &server,
            "POST",
            "/decode",
            &[("authorization", &format!("Bearer {forged}"))],
            "{}",
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn namespace_claim_limits_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let idp = issuer("k1");
        let server = server(&idp, &dir, Some("temporal_namespaces"));
        let token = sign(
            &idp,
            "k1",
            serde_json::json!({"iss":"https://idp.example","aud":"codec","exp":exp(),"temporal_namespaces":["orders"]}),
        );
        let auth = format!("Bearer {token}");
        let ok = call(
            &server,
            "POST",
            "/orders/decode",
            &[("authorization", &auth)],
            "{}",
        )
        .await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
        let no = call(
            &server,
            "POST",
            "/billing/decode",
            &[("authorization", &auth)],
            "{}",
        )
        .await;
        assert_eq!(no.status, StatusCode::FORBIDDEN);
        let without = sign(
            &idp,
            "k1",
            serde_json::json!({"iss":"https://idp.example","aud":"codec","exp":exp()}),
        );
        let reply = call(
            &server,
            "POST",
            "/orders/decode",
            &[("authorization", &format!("Bearer {without}"))],
            "{}",
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
}
