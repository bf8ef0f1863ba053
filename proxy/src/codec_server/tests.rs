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
        kms: None,
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
    // What the Web UI and the CLI send, unless a test says otherwise.
    let given = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if !given("host") {
        builder = builder.header("host", "127.0.0.1:8081");
    }
    if !given("content-type") && method == "POST" {
        builder = builder.header("content-type", "application/json");
    }
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

/// Small payloads are decoded on the request's task, larger ones and small ones that inflate
/// far on the blocking pool: every path gives back what was encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_on_both_sides_of_the_inline_limits_decode() {
    let f = fixture();
    // Hex of an LCG stream: compresses about 2:1, so 200 KiB of it encodes to ~100 KiB.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: String = (0..200 * 1024)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            char::from_digit((x >> 60) as u32, 16).unwrap()
        })
        .collect();
    let input = vec![
        plain("small"),
        plain(&"z".repeat(4 * super::INLINE_OUTPUT_MAX)), // small encoded, inflates far
        plain(&noise),                                    // over the inline input size
        plain(&"y".repeat(super::INLINE_OUTPUT_MAX - 200)), // just within the inline output
    ];
    let reply = call(&f.server, "POST", "/encode", &[], &body_of(&input)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let encoded = parse(&reply.body);
    let sizes: Vec<usize> = encoded.iter().map(|p| p.to_bytes().len()).collect();
    assert!(sizes[1] <= super::INLINE_INPUT_MAX, "{sizes:?}");
    assert!(sizes[2] > super::INLINE_INPUT_MAX, "{sizes:?}");
    assert!(sizes[3] <= super::INLINE_INPUT_MAX, "{sizes:?}");
    let reply = call(&f.server, "POST", "/default/decode", &[], &reply.body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(parse(&reply.body), input);
    // The same payloads one request each (as the CLI sends them).
    for (p, want) in encoded.iter().zip(&input) {
        let reply = call(
            &f.server,
            "POST",
            "/decode",
            &[],
            &body_of(std::slice::from_ref(p)),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(&parse(&reply.body)[0], want);
    }
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
    // ...and cannot resolve one without storage: 422 (a retry cannot change it).
    let reply = call(&f.server, "POST", "/download", &[], &body_of(&[reference])).await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains("storage is not enabled"),
        "{}",
        reply.body
    );
}

// ------------------------------------------------------------------ statuses and metrics

#[test]
fn decode_failures_of_the_payload_are_4xx_and_of_the_gateway_5xx() {
    use super::{codec_status, stage_status};
    use crate::codec::CodecError;
    use crate::rewrite::pipeline::StageCause;
    use crate::storage::StorageFailure;
    let payload_errors = [
        CodecError::UnknownKey("k9".to_owned()),
        CodecError::KeyNotBound {
            key_id: "k1".to_owned(),
            namespace: Some("a".to_owned()),
        },
        CodecError::AuthenticationFailed {
            key_id: "k1".to_owned(),
        },
        CodecError::TooShort {
            key_id: "k1".to_owned(),
            len: 3,
        },
        CodecError::CorruptFrame("x".to_owned()),
        CodecError::Malformed("x".to_owned()),
    ];
    for e in &payload_errors {
        assert_eq!(codec_status(e), StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    }
    assert_eq!(
        codec_status(&CodecError::DecompressedTooLarge { limit: 1 }),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        codec_status(&CodecError::OverBudget { budget: 1 }),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        codec_status(&CodecError::Worker("panicked".to_owned())),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // The key service: refused or not unwrapping is the payload's problem, not asked for now
    // (made-up keys) is 429, too many data keys in one request 413, unreachable 503.
    assert_eq!(
        codec_status(&CodecError::KeyService {
            key_id: "k".to_owned(),
            reason: "x".to_owned()
        }),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        codec_status(&CodecError::KeyThrottled {
            key_id: "k".to_owned(),
            reason: "x".to_owned()
        }),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        codec_status(&CodecError::TooManyDataKeys { found: 33, max: 32 }),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        codec_status(&CodecError::KeyUnavailable {
            key_id: "k".to_owned(),
            reason: "x".to_owned()
        }),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // Storage: missing or refused objects are the payload's problem, an unreachable store
    // is worth the Web UI's retries.
    let storage = |kind| StageCause::Storage {
        kind,
        reason: String::new(),
    };
    for kind in [
        StorageFailure::Lost,
        StorageFailure::Refused,
        StorageFailure::TooLarge,
    ] {
        assert_eq!(
            stage_status(&storage(kind)),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{kind:?}"
        );
    }
    assert_eq!(
        stage_status(&storage(StorageFailure::Unavailable)),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        stage_status(&StageCause::Cancelled),
        StatusCode::GATEWAY_TIMEOUT
    );
    assert_eq!(
        stage_status(&storage(StorageFailure::Budget)),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        stage_status(&StageCause::Budget(crate::budget::Exhausted::Message {
            limit: 1
        })),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        stage_status(&StageCause::Budget(crate::budget::Exhausted::Process {
            limit: 1
        })),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        stage_status(&storage(StorageFailure::Internal)),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        stage_status(&StageCause::Reference("x".to_owned())),
        StatusCode::UNPROCESSABLE_ENTITY
    );
}

/// The value of `pgw_codec_requests_total` for `route` and `status` (0 when absent).
fn codec_count(route: &str, status: u16) -> u64 {
    let needle = format!("pgw_codec_requests_total{{route=\"{route}\",status=\"{status}\"}} ");
    crate::metrics::metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0)
}

#[tokio::test]
async fn requests_are_counted_by_route_and_status_with_bounded_labels() {
    let f = fixture();
    let decode_422 = codec_count("decode", 422);
    let decode_200 = codec_count("decode", 200);
    let other_404 = codec_count("other", 404);
    let preflight = codec_count("preflight", 204);
    let encoded = call(&f.server, "POST", "/encode", &[], &body_of(&[plain("p")])).await;
    let ok = call(&f.server, "POST", "/ns/decode", &[], &encoded.body).await;
    assert_eq!(ok.status, StatusCode::OK);
    let mut tampered = parse(&encoded.body);
    tampered[0]
        .metadata
        .insert("encryption-key-id".to_owned(), b"k-invented".to_vec());
    let bad = call(&f.server, "POST", "/decode", &[], &body_of(&tampered)).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    // Invented paths share one label.
    for path in ["/a-1", "/b-2", "/c/3"] {
        let r = call(&f.server, "POST", path, &[], "{}").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
    }
    let r = call(&f.server, "OPTIONS", "/decode", &[], "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    // Other tests run in parallel on the same registry: at least these were counted.
    assert!(codec_count("decode", 200) > decode_200);
    assert!(codec_count("decode", 422) > decode_422);
    assert!(codec_count("other", 404) >= other_404 + 3);
    assert!(codec_count("preflight", 204) > preflight);
    let rendered = crate::metrics::metrics().render();
    assert!(!rendered.contains("a-1"), "a path became a label value");
    assert!(rendered.contains("pgw_codec_request_duration_seconds_count{route=\"decode\"}"));
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
    let request = Request::post("/decode")
        .header("host", "localhost:8081")
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
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
    bad(
        "[codec_server.tls]\ncert_file = \"c.pem\"\n",
        "codec_server.tls.key_file: required with codec_server.tls.cert_file",
    );
    bad(
        "[codec_server.tls]\nclient_ca_file = \"ca.pem\"\n",
        "codec_server.tls.cert_file",
    );
    bad(
        "[codec_server.tls]\nrequire_client_cert = true\ncert_file = \"c\"\nkey_file = \"k\"\n",
        "codec_server.tls.client_ca_file",
    );
    let ok = Config::from_toml("", Vec::new()).unwrap();
    assert!(ok.codec_server.enabled);
    assert!(!ok.codec_server.tls.enabled());
}

#[test]
fn tls_files_are_read_when_the_server_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CodecServerConfig::default();
    config.tls.cert_file = Some(dir.path().join("missing.pem"));
    config.tls.key_file = Some(dir.path().join("missing.key"));
    let err = CodecServer::with_env(&config, None, |_| None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("codec_server.tls.cert_file: cannot read"),
        "{err}"
    );
    std::fs::write(dir.path().join("missing.pem"), "not pem").unwrap();
    let err = CodecServer::with_env(&config, None, |_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("codec_server.tls.cert_file"), "{err}");
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

    #[tokio::test]
    async fn nbf_is_checked_with_bounded_leeway() {
        let dir = tempfile::tempdir().unwrap();
        let idp = issuer("k1");
        let server = server(&idp, &dir, None);
        let now = exp() - 600;
        let leeway = crate::codec_server::auth::JWT_LEEWAY_SECS;
        let status = |nbf: serde_json::Value| {
            let token = sign(
                &idp,
                "k1",
                serde_json::json!({"iss":"https://idp.example","aud":"codec","exp":exp(),"nbf":nbf}),
            );
            let server = server.clone();
            async move {
                let auth = format!("Bearer {token}");
                let reply = call(
                    &server,
                    "POST",
                    "/decode",
                    &[("authorization", &auth)],
                    "{}",
                )
                .await;
                (reply.status, reply.body)
            }
        };
        // Not yet valid beyond the leeway: refused, naming why.
        let (code, body) = status(serde_json::json!(now + leeway + 120)).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body.contains("Immature"), "{body}");
        // Valid now, or within the leeway of clock skew: accepted.
        for nbf in [now - 10, now + leeway / 2] {
            let (code, body) = status(serde_json::json!(nbf)).await;
            assert_eq!(code, StatusCode::OK, "nbf {nbf}: {body}");
        }
        // An nbf that is not a NumericDate refuses the token.
        for nbf in [
            serde_json::json!("tomorrow"),
            serde_json::json!(-5),
            serde_json::json!(null),
        ] {
            let (code, body) = status(nbf.clone()).await;
            assert_eq!(code, StatusCode::UNAUTHORIZED, "{nbf}: {body}");
            assert!(body.contains("nbf"), "{body}");
        }
    }
}

// ------------------------------------------------------------------ keys bound to namespaces

/// Writes key files `ids` (key material derived from the id) and builds a codec over them.
fn keyring_config(dir: &std::path::Path, ids: &[&str], active: &str) -> Config {
    let mut config = Config::default();
    config.encryption.keys = ids
        .iter()
        .map(|id| {
            let path = dir.join(format!("{id}.key"));
            let mut material = [0u8; 32];
            for (i, b) in id.bytes().enumerate() {
                material[i % 32] ^= b;
            }
            std::fs::write(&path, material).unwrap();
            KeySpec {
                id: (*id).to_owned(),
                file: Some(path),
                env: None,
                kms: None,
            }
        })
        .collect();
    config.encryption.active_key = Some(active.to_owned());
    config
}

fn ns_with_key(key: Option<&str>, decrypt: Option<&[&str]>) -> crate::config::NamespaceConfig {
    crate::config::NamespaceConfig {
        active_key: key.map(str::to_owned),
        decrypt_keys: decrypt.map(|d| d.iter().map(|s| (*s).to_owned()).collect()),
        ..Default::default()
    }
}

#[test]
fn decrypt_key_sets_follow_the_documented_rule() {
    let dir = tempfile::tempdir().unwrap();
    // Single tenant with rotation: every key decrypts everywhere, as before.
    let mut config = keyring_config(dir.path(), &["k1", "k2"], "k2");
    config.namespaces.insert(
        "compressed-only".into(),
        crate::config::NamespaceConfig::default(),
    );
    let codec = PayloadCodec::from_config(&config).unwrap();
    for ns in [None, Some("default"), Some("compressed-only")] {
        assert_eq!(codec.decrypt_key_ids(ns), ["k1", "k2"], "{ns:?}");
    }

    // Namespaces with their own keys: nobody silently gets another namespace's key (the
    // top-level active key k0 is the own key of every namespace without one); retired keys
    // nobody lists stay shared.
    let mut config = keyring_config(dir.path(), &["k0", "ka", "kb", "kc", "old"], "k0");
    config
        .namespaces
        .insert("a".into(), ns_with_key(Some("ka"), None));
    config
        .namespaces
        .insert("b".into(), ns_with_key(Some("kb"), None));
    // c rotated from k0 to kc and lists its old key explicitly.
    config
        .namespaces
        .insert("c".into(), ns_with_key(Some("kc"), Some(&["k0"])));
    let codec = PayloadCodec::from_config(&config).unwrap();
    assert_eq!(codec.decrypt_key_ids(None), ["k0", "old"]);
    assert_eq!(codec.decrypt_key_ids(Some("unconfigured")), ["k0", "old"]);
    assert_eq!(codec.decrypt_key_ids(Some("a")), ["ka", "old"]);
    assert_eq!(codec.decrypt_key_ids(Some("b")), ["kb", "old"]);
    assert_eq!(codec.decrypt_key_ids(Some("c")), ["k0", "kc"]);

    // An explicit top-level list replaces the shared keys for namespaces without their own.
    config.encryption.decrypt_keys = Some(vec![]);
    let codec = PayloadCodec::from_config(&config).unwrap();
    assert_eq!(codec.decrypt_key_ids(None), ["k0"]);
    assert_eq!(codec.decrypt_key_ids(Some("a")), ["ka"]);
    assert_eq!(codec.decrypt_key_ids(Some("c")), ["k0", "kc"]);
}

#[test]
fn decrypt_keys_config_is_validated() {
    let keys = "[encryption]\nactive_key = \"k1\"\nkeys = [{ id = \"k1\", env = \"X\" }, { id = \"k2\", env = \"Y\" }]\n";
    let load = |extra: &str| Config::from_toml(&format!("{keys}{extra}"), Vec::new());
    let ok =
        load("decrypt_keys = [\"k2\"]\n[namespaces.a]\nactive_key = \"k2\"\ndecrypt_keys = []\n")
            .unwrap();
    assert_eq!(ok.encryption.decrypt_keys, Some(vec!["k2".to_owned()]));
    assert_eq!(ok.namespaces["a"].decrypt_keys, Some(vec![]));
    // Unknown ids are configuration errors naming the entry.
    let err = load("decrypt_keys = [\"nope\"]\n").unwrap_err().to_string();
    assert!(err.starts_with("encryption.decrypt_keys[0]"), "{err}");
    let err = load("[namespaces.d]\ndecrypt_keys = [\"k1\", \"gone\"]\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("namespaces.d.decrypt_keys[1]"), "{err}");
}

#[test]
fn decode_for_refuses_keys_not_bound_before_decrypting() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = keyring_config(dir.path(), &["k0", "ka", "kb"], "k0");
    config
        .namespaces
        .insert("a".into(), ns_with_key(Some("ka"), None));
    config
        .namespaces
        .insert("b".into(), ns_with_key(Some("kb"), None));
    let codec = PayloadCodec::from_config(&config).unwrap();
    let secret = plain("secret-of-b").to_bytes();
    let sealed = codec.encode(Some("b"), &secret).unwrap().unwrap();
    assert_eq!(
        codec.decode_for(Some("b"), &sealed).unwrap().unwrap(),
        secret
    );
    // The unscoped form (the gRPC path today) still decrypts with any key.
    assert_eq!(codec.decode(&sealed).unwrap().unwrap(), secret);
    for ns in [Some("a"), None, Some("other")] {
        let err = codec.decode_for(ns, &sealed).unwrap_err();
        assert!(
            matches!(&err, crate::codec::CodecError::KeyNotBound { key_id, .. } if key_id == "kb"),
            "{ns:?}: {err}"
        );
        assert!(err.to_string().contains("not bound"), "{err}");
    }
}

fn server_over(config: &Config, edit: impl FnOnce(&mut CodecServerConfig)) -> CodecServer {
    let mut sc = CodecServerConfig::default();
    edit(&mut sc);
    let pipeline = Pipeline::new(Arc::new(PayloadCodec::from_config(config).unwrap()));
    CodecServer::with_env(&sc, Some(pipeline), |_| None).unwrap()
}

#[tokio::test]
async fn cross_namespace_decode_is_refused_without_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = keyring_config(dir.path(), &["k0", "ka", "kb"], "k0");
    config
        .namespaces
        .insert("a".into(), ns_with_key(Some("ka"), None));
    config
        .namespaces
        .insert("b".into(), ns_with_key(Some("kb"), None));
    let server = server_over(&config, |_| {});
    let secret = plain("secret-of-b-7f3a");
    let enc = call(
        &server,
        "POST",
        "/b/encode",
        &[],
        &body_of(std::slice::from_ref(&secret)),
    )
    .await;
    assert_eq!(enc.status, StatusCode::OK, "{}", enc.body);
    let sealed = parse(&enc.body);
    assert_eq!(sealed[0].meta_str("encryption-key-id"), Some("kb"));

    let own = call(&server, "POST", "/b/decode", &[], &enc.body).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.body);
    assert_eq!(parse(&own.body), [secret]);

    for (path, headers) in [
        ("/a/decode", vec![]),
        ("/decode", vec![("x-namespace", "a")]),
        ("/decode", vec![]),
    ] {
        let reply = call(&server, "POST", path, &headers, &enc.body).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}: {}",
            reply.body
        );
        assert!(
            reply.body.contains("\"kb\"") && reply.body.contains("not bound"),
            "{path}: {}",
            reply.body
        );
        assert!(!reply.body.contains("secret-of-b"), "{}", reply.body);
    }
}

// ------------------------------------------------------------------ host and content type

#[tokio::test]
async fn content_type_must_be_json() {
    let f = fixture();
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
    ] {
        let reply = call(&f.server, "POST", "/decode", &[("content-type", ct)], "{}").await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{ct:?}: {}",
            reply.body
        );
        assert!(reply.body.contains("application/json"), "{}", reply.body);
    }
    // Missing entirely.
    let request = Request::post("/decode")
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(
        f.server.handle(request).await.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    for ct in [
        "application/json",
        "Application/JSON; charset=utf-8",
        "application/json;charset=UTF-8",
    ] {
        let reply = call(&f.server, "POST", "/decode", &[("content-type", ct)], "{}").await;
        assert_eq!(reply.status, StatusCode::OK, "{ct:?}: {}", reply.body);
    }
}

#[tokio::test]
async fn host_must_be_allowed() {
    let f = fixture();
    for host in [
        "localhost",
        "localhost:8081",
        "LOCALHOST.:9",
        "127.0.0.1:1",
        "[::1]:8081",
        "[0:0::1]",
    ] {
        let reply = call(&f.server, "POST", "/decode", &[("host", host)], "{}").await;
        assert_eq!(reply.status, StatusCode::OK, "{host}: {}", reply.body);
    }
    for host in [
        "evil.example",
        "evil.example:8081",
        "localhost.evil.example",
        "127.0.0.2:8081",
        "user@localhost",
        "[::2]",
    ] {
        for method in ["POST", "OPTIONS"] {
            let reply = call(&f.server, method, "/decode", &[("host", host)], "{}").await;
            assert_eq!(
                reply.status,
                StatusCode::MISDIRECTED_REQUEST,
                "{host}: {}",
                reply.body
            );
            assert!(reply.body.contains("allowed_hosts"), "{}", reply.body);
        }
    }
    // HTTP/2 :authority (and HTTP/1 absolute-form) is checked too, whatever Host says.
    let reply = call(
        &f.server,
        "POST",
        "http://evil.example:8081/decode",
        &[("host", "localhost")],
        "{}",
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::MISDIRECTED_REQUEST,
        "{}",
        reply.body
    );
    let request = Request::post("http://localhost:8081/decode")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(f.server.handle(request).await.status(), StatusCode::OK);
    // No host at all.
    let request = Request::post("/decode")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(
        f.server.handle(request).await.status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn configured_hosts_and_the_listen_address_are_allowed() {
    let f = fixture_with(
        |c| {
            c.listen = "10.1.2.3:9000".parse().unwrap();
            c.allowed_hosts = vec!["codec.internal".into(), "ui.example:443".into()];
        },
        &[],
    );
    for (host, ok) in [
        ("codec.internal", true),
        ("codec.internal:8443", true),
        ("ui.example:443", true),
        ("ui.example:444", false),
        ("10.1.2.3:9000", true),
        ("10.1.2.3:9001", false),
        ("localhost", false),
    ] {
        let reply = call(&f.server, "POST", "/decode", &[("host", host)], "{}").await;
        let want = if ok {
            StatusCode::OK
        } else {
            StatusCode::MISDIRECTED_REQUEST
        };
        assert_eq!(reply.status, want, "{host}: {}", reply.body);
    }
    let any = fixture_with(|c| c.allowed_hosts = vec!["*".into()], &[]);
    let reply = call(
        &any.server,
        "POST",
        "/decode",
        &[("host", "whatever.example")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    // Bad entries are configuration errors naming the entry.
    let err = Config::from_toml(
        "[codec_server]\nallowed_hosts = [\"ok\", \"http://x/\"]\n",
        Vec::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("codec_server.allowed_hosts[1]"), "{err}");
}

// ------------------------------------------------------------------ limits while parsing

#[test]
fn payload_count_is_limited_while_parsing() {
    // 2 M entries of `null,`: refused at entry 11 without reading the rest.
    let mut body = String::from("{\"payloads\":[");
    body.push_str(&"null,".repeat(2_000_000));
    body.push_str("null]}");
    let started = std::time::Instant::now();
    let err = json::parse_payloads_limited(body.as_bytes(), 10).unwrap_err();
    assert_eq!(err, json::ParseError::TooManyPayloads { max: 10 });
    assert!(
        started.elapsed() < std::time::Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    // Exactly the limit is fine; one more is not.
    let ten = body_of(&vec![plain("x"); 10]);
    assert_eq!(
        json::parse_payloads_limited(ten.as_bytes(), 10)
            .unwrap()
            .len(),
        10
    );
    let eleven = body_of(&vec![plain("x"); 11]);
    assert!(json::parse_payloads_limited(eleven.as_bytes(), 10).is_err());
    // Metadata entries count too: 64 per allowed payload in total.
    let mut meta = String::from("{\"payloads\":[{\"metadata\":{");
    meta.push_str(
        &(0..641)
            .map(|i| format!("\"k{i}\":null"))
            .collect::<Vec<_>>()
            .join(","),
    );
    meta.push_str("}}]}");
    assert_eq!(
        json::parse_payloads_limited(meta.as_bytes(), 10).unwrap_err(),
        json::ParseError::TooManyFields { max: 640 }
    );
    // Syntax errors are still syntax errors.
    assert!(matches!(
        json::parse_payloads_limited(b"{\"payloads\":[", 10),
        Err(json::ParseError::Json(_))
    ));
    assert!(matches!(
        json::parse_payloads_limited(b"{\"payloads\":[],\"payloads\":[]}", 10),
        Err(json::ParseError::Json(_))
    ));
}

#[tokio::test]
async fn millions_of_nulls_are_413_at_once() {
    let f = fixture_with(|c| c.max_payloads = 1_000, &[]);
    let mut body = String::from("{\"payloads\":[");
    body.push_str(&"null,".repeat(6_000_000));
    body.push_str("null]}");
    let started = std::time::Instant::now();
    let reply = call(&f.server, "POST", "/decode", &[], &body).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.body
    );
    assert!(reply.body.contains("max_payloads = 1000"), "{}", reply.body);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

// ------------------------------------------------------------------ decoded-size budget

/// A `binary/zstd` payload inflating to a payload of `size` zero bytes; the frame does not
/// declare its size (as a streaming encoder writes it), so only inflating finds out.
fn zstd_bomb(size: usize) -> Payload {
    let inner = Payload {
        metadata: BTreeMap::from([("encoding".to_owned(), b"binary/plain".to_vec())]),
        data: Bytes::from(vec![0u8; size]),
        external_payloads: Vec::new(),
    }
    .to_bytes();
    let mut frame = Vec::new();
    let mut enc = zstd::stream::Encoder::new(&mut frame, 3).unwrap();
    std::io::Write::write_all(&mut enc, &inner).unwrap();
    enc.finish().unwrap();
    assert!(matches!(
        zstd::zstd_safe::get_frame_content_size(&frame),
        Ok(None)
    ));
    Payload {
        metadata: BTreeMap::from([("encoding".to_owned(), b"binary/zstd".to_vec())]),
        data: Bytes::from(frame),
        external_payloads: Vec::new(),
    }
}

#[tokio::test]
async fn decoded_size_is_bounded_per_request() {
    const MIB: usize = 1024 * 1024;
    let f = fixture_with(|c| c.max_decoded_bytes = 4 * MIB, &[]);
    // One payload inflating past the whole budget: refused while inflating.
    let reply = call(
        &f.server,
        "POST",
        "/decode",
        &[],
        &body_of(&[zstd_bomb(64 * MIB)]),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains("max_decoded_bytes") && reply.body.contains("payload 0"),
        "{}",
        reply.body
    );
    // Payloads each under the budget, together over it: refused at the one that passes it.
    let three = vec![zstd_bomb(MIB + MIB / 2); 3];
    let reply = call(&f.server, "POST", "/decode", &[], &body_of(&three)).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.body
    );
    assert!(reply.body.contains("payload 2"), "{}", reply.body);
    let reply = call(&f.server, "POST", "/decode", &[], &body_of(&three[..2])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(parse(&reply.body)[1].data.len(), MIB + MIB / 2);
    // Encrypted and compressed (the gateway's own payloads) draw from the same budget.
    let big = plain(&"z".repeat(6 * MIB));
    let enc = call(&f.server, "POST", "/encode", &[], &body_of(&[big])).await;
    assert_eq!(enc.status, StatusCode::OK);
    assert!(enc.body.len() < MIB, "compressed: {}", enc.body.len());
    let reply = call(&f.server, "POST", "/decode", &[], &enc.body).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.body
    );
    assert!(reply.body.contains("max_decoded_bytes"), "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_request_stops_decoding() {
    let f = fixture_with(
        |c| {
            c.request_timeout_ms = 20;
            c.max_payloads = 5_000;
            c.max_decoded_bytes = usize::MAX;
        },
        &[],
    );
    let payloads = vec![zstd_bomb(256 * 1024); 3_000];
    let body = body_of(&payloads);
    let reply = call(&f.server, "POST", "/decode", &[], &body).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.body);
    let seen = f
        .server
        .inner
        .decoded
        .load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let later = f
        .server
        .inner
        .decoded
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(later < 3_000, "all payloads were decoded after the timeout");
    assert!(
        later <= seen + 1,
        "decoding went on after the timeout: {seen} -> {later}"
    );
}
