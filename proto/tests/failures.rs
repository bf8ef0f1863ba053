//! Failure sites and failure edits (seal / restore): hand-built messages with the
//! `temporalio-protos` prost types (cause chains, `Any` values, system envelopes, unknown
//! fields), and a property test against a reflective (prost-reflect) oracle over random
//! messages of every payload-bearing WorkflowService type.

mod common;

use bytes::Bytes;
use common::*;
use payload_gateway_proto::{
    ENCODED_FAILURE_MESSAGE, FailureEdit, MessageType, Scan, WalkError, methods, scan,
};
use proptest::prelude::*;
use prost::Message;
use prost_reflect::{DynamicMessage, ReflectMessage, Value};
use temporalio_protos::protos::temporal::api::{
    common::v1::{Payload, Payloads},
    failure::v1 as failure,
    protocol::v1 as protocol,
    update::v1 as update,
    workflowservice::v1 as ws,
};

const FAILURE: &str = "temporal.api.failure.v1.Failure";

fn p(data: &str) -> Payload {
    Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())].into(),
        data: data.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn app_failure(message: &str, stack: &str, cause: Option<failure::Failure>) -> failure::Failure {
    failure::Failure {
        message: message.into(),
        source: "PythonSDK".into(),
        stack_trace: stack.into(),
        cause: cause.map(Box::new),
        failure_info: Some(failure::failure::FailureInfo::ApplicationFailureInfo(
            failure::ApplicationFailureInfo {
                r#type: "ValueError".into(),
                details: Some(Payloads {
                    payloads: vec![p(&format!("details, {} bytes", message.len()))],
                }),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The attributes payload the tests seal with: the message and stack trace in its data.
fn sealed_attrs(message: &[u8], stack: &[u8]) -> Bytes {
    let mut data = message.to_vec();
    data.push(b'|');
    data.extend_from_slice(stack);
    Bytes::from(
        Payload {
            metadata: [("encoding".to_string(), b"test/sealed".to_vec())].into(),
            data,
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

/// Seals every failure that has something to seal and no attributes.
fn seal_all(s: &Scan, bytes: &Bytes) -> Vec<Option<FailureEdit>> {
    s.failures()
        .iter()
        .map(|f| {
            let text = |r: Option<std::ops::Range<usize>>| r.map_or(&b""[..], |r| &bytes[r]);
            (!f.has_encoded_attributes() && (f.message().is_some() || f.stack_trace().is_some()))
                .then(|| FailureEdit::Seal {
                    attributes: sealed_attrs(text(f.message()), text(f.stack_trace())),
                })
        })
        .collect()
}

fn sealed(f: &failure::Failure) -> failure::Failure {
    let mut out = f.clone();
    out.encoded_attributes = Some(
        Payload::decode(sealed_attrs(f.message.as_bytes(), f.stack_trace.as_bytes())).unwrap(),
    );
    out.message = ENCODED_FAILURE_MESSAGE.into();
    out.stack_trace = String::new();
    out.cause = f.cause.as_deref().map(|c| Box::new(sealed(c)));
    out
}

/// A protocol message whose `body` Any holds `value` as `type_url`.
fn with_body(mut m: protocol::Message, type_url: &str, value: Vec<u8>) -> protocol::Message {
    let mut body = m.body.take().unwrap_or_default();
    body.type_url = type_url.into();
    body.value = value;
    m.body = Some(body);
    m
}

fn ty(name: &str) -> MessageType {
    MessageType::by_name(name).unwrap()
}

#[test]
fn cause_chain_is_sealed_at_every_level_and_restored() {
    let chain = app_failure(
        "outer secret",
        "outer stack",
        Some(app_failure(
            "middle secret",
            "",
            Some(app_failure("", "inner stack only", None)),
        )),
    );
    let req = ws::RespondActivityTaskFailedRequest {
        task_token: b"tok".to_vec(),
        failure: Some(chain.clone()),
        namespace: "ns".into(),
        last_heartbeat_details: Some(Payloads {
            payloads: vec![p("hb")],
        }),
        ..Default::default()
    };
    let name = "temporal.api.workflowservice.v1.RespondActivityTaskFailedRequest";
    let bytes = Bytes::from(req.encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    let paths: Vec<String> = s.failures().iter().map(|f| f.path().to_string()).collect();
    assert_eq!(paths, ["failure", "failure.cause", "failure.cause.cause"]);
    assert_eq!(&bytes[s.failures()[0].message().unwrap()], b"outer secret");
    assert_eq!(
        s.failures()[1].stack_trace(),
        None,
        "empty strings are absent"
    );
    assert_eq!(s.failures()[2].message(), None);

    // Seal every level and mark every payload in one splice.
    let edits = seal_all(&s, &bytes);
    assert!(edits.iter().all(Option::is_some));
    let reps: Vec<_> = s
        .sites()
        .iter()
        .map(|x| {
            let mut p = Payload::decode(&bytes[x.range()]).unwrap();
            p.data.extend_from_slice(b"!");
            Some(Bytes::from(p.encode_to_vec()))
        })
        .collect();
    let out = s.splice_with(&bytes, &reps, &edits).unwrap();
    let got = ws::RespondActivityTaskFailedRequest::decode(&out[..]).unwrap();
    let mut want = req.clone();
    want.failure = Some(sealed(&chain));
    // The marked payloads: every level's details, and the heartbeat details.
    let mut f = want.failure.as_mut();
    while let Some(x) = f {
        if let Some(failure::failure::FailureInfo::ApplicationFailureInfo(a)) =
            x.failure_info.as_mut()
        {
            a.details.as_mut().unwrap().payloads[0].data.push(b'!');
        }
        f = x.cause.as_deref_mut();
    }
    want.last_heartbeat_details.as_mut().unwrap().payloads[0]
        .data
        .push(b'!');
    assert_eq!(got, want);
    // Restore: back to the original, attributes dropped (the sealed attributes of this
    // test hold `message|stack`).
    let again = scan(ty(name), &out).unwrap();
    assert_eq!(again.failures().len(), 3);
    let restore: Vec<_> = again
        .failures()
        .iter()
        .map(|f| {
            let site = &again.sites()[f.encoded_attributes_site().unwrap()];
            let attrs = Payload::decode(&out[site.range()]).unwrap();
            let text = String::from_utf8(attrs.data).unwrap();
            let (m, st) = text.split_once('|').unwrap();
            Some(FailureEdit::Restore {
                message: Some(m.to_owned()),
                stack_trace: Some(st.to_owned()),
            })
        })
        .collect();
    let none = vec![None; again.sites().len()];
    let back = again.splice_with(&out, &none, &restore).unwrap();
    let got = ws::RespondActivityTaskFailedRequest::decode(&back[..]).unwrap();
    let mut want = req;
    want.failure = Some(chain);
    let mut f = want.failure.as_mut();
    while let Some(x) = f {
        if let Some(failure::failure::FailureInfo::ApplicationFailureInfo(a)) =
            x.failure_info.as_mut()
        {
            a.details.as_mut().unwrap().payloads[0].data.push(b'!');
        }
        f = x.cause.as_deref_mut();
    }
    want.last_heartbeat_details.as_mut().unwrap().payloads[0]
        .data
        .push(b'!');
    assert_eq!(got, want);
}

#[test]
fn unknown_fields_and_field_order_survive_a_seal() {
    // A failure with an unknown field (9001, bytes) between its fields and a duplicate
    // message (the last wins for a decoder; both must go).
    let f = app_failure("secret two", "stack", None);
    let mut fb = f.encode_to_vec();
    prost::encoding::encode_key(9001, prost::encoding::WireType::LengthDelimited, &mut fb);
    prost::encoding::encode_varint(4, &mut fb);
    fb.extend_from_slice(b"UNKN");
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut fb);
    prost::encoding::encode_varint(10, &mut fb);
    fb.extend_from_slice(b"secret one");
    let mut req = Vec::new();
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut req);
    prost::encoding::encode_varint(fb.len() as u64, &mut req);
    req.extend_from_slice(&fb);
    let bytes = Bytes::from(req);
    let name = "temporal.api.workflowservice.v1.RespondActivityTaskFailedRequest";
    let decoded = ws::RespondActivityTaskFailedRequest::decode(&bytes[..]).unwrap();
    assert_eq!(decoded.failure.as_ref().unwrap().message, "secret one");

    let s = scan(ty(name), &bytes).unwrap();
    assert_eq!(s.failures().len(), 1);
    assert_eq!(&bytes[s.failures()[0].message().unwrap()], b"secret one");
    let edits = vec![Some(FailureEdit::Seal {
        attributes: sealed_attrs(b"secret one", b"stack"),
    })];
    let out = s
        .splice_with(&bytes, &vec![None; s.sites().len()], &edits)
        .unwrap();
    assert!(!out.windows(10).any(|w| w == b"secret two"));
    assert!(out.windows(4).any(|w| w == b"UNKN"), "unknown field lost");
    let got = ws::RespondActivityTaskFailedRequest::decode(&out[..]).unwrap();
    let gf = got.failure.unwrap();
    assert_eq!(gf.message, ENCODED_FAILURE_MESSAGE);
    assert_eq!(gf.stack_trace, "");
    assert_eq!(gf.encoded_attributes.unwrap().data, b"secret one|stack");
    assert_eq!(gf.failure_info, f.failure_info);
    assert_eq!(gf.source, f.source);
    // The only "secret one" left is inside the sealed attributes (this test does not
    // encrypt them): both message fields are gone.
    assert_eq!(
        out.windows(10).filter(|w| *w == b"secret one").count(),
        1,
        "an original message field is still there"
    );
}

#[test]
fn failure_inside_an_any_and_inside_a_system_envelope() {
    // Update rejection in a protocol message body (an Any).
    let rejection = update::Rejection {
        rejected_request_message_id: "m0".into(),
        failure: Some(app_failure("rejected secret", "", None)),
        ..Default::default()
    };
    let msg = with_body(
        protocol::Message {
            id: "m1".into(),
            protocol_instance_id: "u1".into(),
            ..Default::default()
        },
        "type.googleapis.com/temporal.api.update.v1.Rejection",
        rejection.encode_to_vec(),
    );
    let done = ws::RespondWorkflowTaskCompletedRequest {
        messages: vec![msg.clone()],
        identity: "w".into(),
        ..Default::default()
    };
    let name = "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";
    let bytes = Bytes::from(done.encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    assert_eq!(s.failures().len(), 1);
    assert_eq!(
        s.failures()[0].path().to_string(),
        "messages.body[temporal.api.update.v1.Rejection].failure"
    );
    let out = s
        .splice_with(&bytes, &vec![None; s.sites().len()], &seal_all(&s, &bytes))
        .unwrap();
    let got = ws::RespondWorkflowTaskCompletedRequest::decode(&out[..]).unwrap();
    let body = got.messages[0].body.as_ref().unwrap();
    let rej = update::Rejection::decode(&body.value[..]).unwrap();
    let mut want = rejection.clone();
    want.failure = Some(sealed(rejection.failure.as_ref().unwrap()));
    assert_eq!(rej, want);
    assert_eq!(got.identity, "w");

    // A failure carried whole in a system envelope (binary/protobuf, messageType Failure).
    let envelope = Payload {
        metadata: [
            ("__temporal_system_payload".to_string(), b"true".to_vec()),
            ("encoding".to_string(), b"binary/protobuf".to_vec()),
            ("messageType".to_string(), FAILURE.as_bytes().to_vec()),
        ]
        .into(),
        data: app_failure("enveloped secret", "st", None).encode_to_vec(),
        ..Default::default()
    };
    let q = ws::QueryWorkflowResponse {
        query_result: Some(Payloads {
            payloads: vec![envelope.clone()],
        }),
        ..Default::default()
    };
    let name = "temporal.api.workflowservice.v1.QueryWorkflowResponse";
    let bytes = Bytes::from(q.encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    assert_eq!(
        s.failures()[0].path().to_string(),
        format!("query_result.payloads[{FAILURE}]")
    );
    let out = s
        .splice_with(&bytes, &vec![None; s.sites().len()], &seal_all(&s, &bytes))
        .unwrap();
    let got = ws::QueryWorkflowResponse::decode(&out[..]).unwrap();
    let env = &got.query_result.unwrap().payloads[0];
    assert_eq!(env.metadata, envelope.metadata);
    let inner = failure::Failure::decode(&env.data[..]).unwrap();
    assert_eq!(inner, sealed(&app_failure("enveloped secret", "st", None)));
}

#[test]
fn edit_errors() {
    let mut f = app_failure("m", "", None);
    f.encoded_attributes = Some(p("attrs"));
    let req = ws::RespondActivityTaskFailedRequest {
        failure: Some(f),
        ..Default::default()
    };
    let name = "temporal.api.workflowservice.v1.RespondActivityTaskFailedRequest";
    let bytes = Bytes::from(req.encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    assert_eq!(s.failures().len(), 1);
    assert!(s.failures()[0].has_encoded_attributes());
    let idx = s.failures()[0].encoded_attributes_site().unwrap();
    assert_eq!(
        s.sites()[idx].path().to_string(),
        "failure.encoded_attributes"
    );
    let none = vec![None; s.sites().len()];
    let seal = vec![Some(FailureEdit::Seal {
        attributes: Bytes::new(),
    })];
    assert!(matches!(
        s.splice_with(&bytes, &none, &seal),
        Err(WalkError::BadEdit { index: 0, .. })
    ));
    assert!(matches!(
        s.splice_with(&bytes, &none, &[]),
        Err(WalkError::EditCount {
            expected: 1,
            got: 0
        })
    ));
    // Restoring a failure without attributes is refused too.
    let plain = ws::RespondActivityTaskFailedRequest {
        failure: Some(app_failure("m", "", None)),
        ..Default::default()
    };
    let bytes = Bytes::from(plain.encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    let restore = vec![Some(FailureEdit::Restore {
        message: Some("x".into()),
        stack_trace: None,
    })];
    assert!(matches!(
        s.splice_with(&bytes, &vec![None; s.sites().len()], &restore),
        Err(WalkError::BadEdit { index: 0, .. })
    ));
    // A failure with nothing in it is not a failure site.
    let empty = ws::RespondActivityTaskFailedRequest {
        failure: Some(failure::Failure {
            source: "x".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = Bytes::from(empty.encode_to_vec());
    assert!(scan(ty(name), &bytes).unwrap().failures().is_empty());
}

#[test]
fn restore_keeps_what_the_attributes_do_not_hold() {
    let mut f = app_failure(ENCODED_FAILURE_MESSAGE, "kept stack", None);
    f.encoded_attributes = Some(p("attrs"));
    let req = ws::RespondActivityTaskFailedRequest {
        failure: Some(f.clone()),
        ..Default::default()
    };
    let name = "temporal.api.workflowservice.v1.RespondActivityTaskFailedRequest";
    let bytes = Bytes::from(req.encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    // The attributes payload is also replaced: the replacement is dropped with the field.
    let reps: Vec<_> = s
        .sites()
        .iter()
        .map(|_| Some(Bytes::from(p("replaced").encode_to_vec())))
        .collect();
    let restore = vec![Some(FailureEdit::Restore {
        message: Some("the message".into()),
        stack_trace: None,
    })];
    let out = s.splice_with(&bytes, &reps, &restore).unwrap();
    let got = ws::RespondActivityTaskFailedRequest::decode(&out[..]).unwrap();
    let gf = got.failure.unwrap();
    assert_eq!(gf.message, "the message");
    assert_eq!(gf.stack_trace, "kept stack");
    assert_eq!(gf.encoded_attributes, None);
    // The details payload was replaced as asked.
    let Some(failure::failure::FailureInfo::ApplicationFailureInfo(a)) = gf.failure_info else {
        panic!("failure info lost");
    };
    assert_eq!(a.details.unwrap().payloads[0].data, b"replaced");
}

#[test]
fn unknown_anys_are_recorded_once_per_type_and_path_and_bounded() {
    let mk = |t: &str| {
        with_body(
            protocol::Message {
                id: "m".into(),
                ..Default::default()
            },
            &format!("type.googleapis.com/{t}"),
            b"\x0a\x06secret".to_vec(),
        )
    };
    let mut messages = vec![mk("a.B"), mk("a.B"), mk("c.D")];
    // A value without a type_url.
    messages.push(with_body(protocol::Message::default(), "", b"x".to_vec()));
    let poll = ws::PollWorkflowTaskQueueResponse {
        messages,
        ..Default::default()
    };
    let name = "temporal.api.workflowservice.v1.PollWorkflowTaskQueueResponse";
    let s = scan(ty(name), &Bytes::from(poll.encode_to_vec())).unwrap();
    assert_eq!(s.unknown_any(), 4);
    let got: Vec<(&str, &str)> = s
        .unknown_anys()
        .iter()
        .map(|u| (u.type_name.as_str(), u.path.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("a.B", "messages.body"),
            ("c.D", "messages.body"),
            ("", "messages.body")
        ]
    );
    // Thousands of distinct unknown types: all counted, a bounded list recorded.
    let poll = ws::PollWorkflowTaskQueueResponse {
        messages: (0..5000).map(|i| mk(&format!("t.T{i}"))).collect(),
        ..Default::default()
    };
    let s = scan(ty(name), &Bytes::from(poll.encode_to_vec())).unwrap();
    assert_eq!(s.unknown_any(), 5000);
    assert_eq!(
        s.unknown_anys().len(),
        payload_gateway_proto::MAX_UNKNOWN_ANYS
    );
}

#[test]
fn unopenable_system_envelopes_are_sites() {
    let name = "temporal.api.workflowservice.v1.QueryWorkflowResponse";
    let base = |meta: &[(&str, &[u8])], data: Option<&[u8]>| Payload {
        metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect(),
        data: data.map(<[u8]>::to_vec).unwrap_or_default(),
        ..Default::default()
    };
    let sys: (&str, &[u8]) = ("__temporal_system_payload", b"true");
    let pb: (&str, &[u8]) = ("encoding", b"binary/protobuf");
    let cases = [
        // messageType unknown
        base(&[sys, pb, ("messageType", b"x.Nope")], Some(b"secret")),
        // messageType known, but not binary/protobuf
        base(
            &[
                sys,
                ("encoding", b"json/plain"),
                ("messageType", FAILURE.as_bytes()),
            ],
            Some(b"secret"),
        ),
        // binary/protobuf without messageType
        base(&[sys, pb], Some(b"secret")),
        // known payload-bearing type, no data
        base(&[sys, pb, ("messageType", FAILURE.as_bytes())], None),
    ];
    for (i, payload) in cases.into_iter().enumerate() {
        let q = ws::QueryWorkflowResponse {
            query_result: Some(Payloads {
                payloads: vec![payload],
            }),
            ..Default::default()
        };
        let bytes = Bytes::from(q.encode_to_vec());
        let s = scan(ty(name), &bytes).unwrap();
        assert_eq!(
            (s.sites().len(), s.opaque_system_payloads()),
            (1, 1),
            "case {i}"
        );
        assert_eq!(s.sites()[0].path().to_string(), "query_result.payloads");
    }
}

// ---- property test against the reflective oracle ----

/// The edit the property test applies, chosen from the failure's contents only (so the
/// wire walk and the reflective walk agree without relying on visiting order).
fn choose(message: &str, stack: &str, has_attrs: bool) -> Option<FailureEdit> {
    if has_attrs {
        Some(FailureEdit::Restore {
            message: Some(format!("R{message}")),
            stack_trace: (message.len() % 2 == 1).then(String::new),
        })
    } else if !message.is_empty() || !stack.is_empty() {
        Some(FailureEdit::Seal {
            attributes: sealed_attrs(message.as_bytes(), stack.as_bytes()),
        })
    } else {
        None
    }
}

/// Calls `f` on every Failure (after its children), following `Any` values of known types.
fn visit_failures(m: &mut DynamicMessage, f: &mut dyn FnMut(&mut DynamicMessage)) {
    let d = m.descriptor();
    if d.full_name() == ANY {
        let url = m
            .get_field_by_name("type_url")
            .unwrap()
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = url.rsplit('/').next().unwrap_or_default();
        if let Some(inner_d) = pool().get_message_by_name(name) {
            if !reaches(&inner_d) {
                return;
            }
            let value = m
                .get_field_by_name("value")
                .unwrap()
                .as_bytes()
                .cloned()
                .unwrap_or_default();
            let mut inner = DynamicMessage::decode(inner_d, value).unwrap();
            visit_failures(&mut inner, f);
            m.set_field_by_name("value", Value::Bytes(Bytes::from(inner.encode_to_vec())));
        }
        return;
    }
    if d.full_name() == PAYLOAD || d.full_name() == SEARCH_ATTRIBUTES {
        return;
    }
    for (_, v) in m.fields_mut() {
        visit_value(v, f);
    }
    if d.full_name() == FAILURE {
        f(m);
    }
}

fn visit_value(v: &mut Value, f: &mut dyn FnMut(&mut DynamicMessage)) {
    match v {
        Value::Message(m) => visit_failures(m, f),
        Value::List(l) => l.iter_mut().for_each(|x| visit_value(x, f)),
        Value::Map(map) => map.values_mut().for_each(|x| visit_value(x, f)),
        _ => {}
    }
}

fn apply_reflectively(m: &mut DynamicMessage) {
    let text = |m: &DynamicMessage, k| {
        m.get_field_by_name(k)
            .unwrap()
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let (msg, stack) = (text(m, "message"), text(m, "stack_trace"));
    let has_attrs = m.has_field_by_name("encoded_attributes");
    match choose(&msg, &stack, has_attrs) {
        None => {}
        Some(FailureEdit::Seal { attributes }) => {
            let p = Payload::decode(attributes).unwrap();
            let mut pm = DynamicMessage::new(desc(PAYLOAD));
            pm.transcode_from(&p).unwrap();
            m.set_field_by_name("encoded_attributes", Value::Message(pm));
            m.set_field_by_name("message", Value::String(ENCODED_FAILURE_MESSAGE.into()));
            m.clear_field_by_name("stack_trace");
        }
        Some(FailureEdit::Restore {
            message,
            stack_trace,
        }) => {
            m.clear_field_by_name("encoded_attributes");
            for (k, v) in [("message", message), ("stack_trace", stack_trace)] {
                match v {
                    Some(v) if v.is_empty() => m.clear_field_by_name(k),
                    Some(v) => m.set_field_by_name(k, Value::String(v)),
                    None => {}
                }
            }
        }
    }
}

fn check_edits(name: &str, bytes: &Bytes, unknown: &[Vec<u8>]) -> usize {
    let t = ty(name);
    let s = scan(t, bytes).unwrap();
    let text = |r: Option<std::ops::Range<usize>>| {
        r.map_or(String::new(), |r| {
            String::from_utf8(bytes[r].to_vec()).unwrap()
        })
    };
    let edits: Vec<_> = s
        .failures()
        .iter()
        .map(|f| {
            choose(
                &text(f.message()),
                &text(f.stack_trace()),
                f.has_encoded_attributes(),
            )
        })
        .collect();
    // Mark every payload too, in the same splice.
    let reps: Vec<_> = s
        .sites()
        .iter()
        .map(|x| {
            let mut p = Payload::decode(&bytes[x.range()]).unwrap();
            mark(&mut p);
            Some(Bytes::from(p.encode_to_vec()))
        })
        .collect();
    let out = s.splice_with(bytes, &reps, &edits).unwrap();
    let d = desc(name);
    let got = DynamicMessage::decode(d.clone(), out.clone()).expect("edited message decodes");
    let mut want = DynamicMessage::decode(d, bytes.clone()).unwrap();
    reflect_visit(&mut want, &mut |p| {
        let mut x = p.transcode_to::<Payload>().unwrap();
        mark(&mut x);
        p.transcode_from(&x).unwrap();
    });
    visit_failures(&mut want, &mut apply_reflectively);
    assert!(
        same(&got, &want),
        "{name}: edited message differs from the reflectively edited one"
    );
    for u in unknown {
        assert!(
            out.windows(u.len()).any(|w| w == u.as_slice()),
            "{name}: unknown field lost"
        );
    }
    s.failures().len()
}

fn workflow_service_types() -> Vec<&'static str> {
    let mut v: Vec<_> = methods()
        .filter(|m| {
            m.path
                .starts_with("/temporal.api.workflowservice.v1.WorkflowService/")
        })
        .flat_map(|m| [m.request, m.response])
        .filter(|t| t.can_hold_payloads())
        .map(|t| t.name())
        .collect();
    v.sort();
    v.dedup();
    v
}

fn generate(name: &str, seed: u64) -> (Bytes, Vec<Vec<u8>>) {
    let mut rng = Rng(seed);
    let mut unknown = Vec::new();
    let g = Gen {
        max_depth: 7,
        unknown_fields: true,
    };
    let m = gen_message(&desc(name), &mut rng, g, 0, &mut unknown);
    (Bytes::from(m.encode_to_vec()), unknown)
}

/// Types where failures are common.
const FAILURE_TYPES: &[&str] = &[
    "temporal.api.workflowservice.v1.RespondActivityTaskFailedRequest",
    "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest",
    "temporal.api.workflowservice.v1.RespondWorkflowTaskFailedRequest",
    "temporal.api.workflowservice.v1.GetWorkflowExecutionHistoryResponse",
    "temporal.api.workflowservice.v1.PollWorkflowExecutionUpdateResponse",
    "temporal.api.workflowservice.v1.RespondNexusTaskFailedRequest",
    "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest",
    "temporal.api.workflowservice.v1.PollWorkflowTaskQueueResponse",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn edits_match_the_reflective_oracle(i in 0..FAILURE_TYPES.len(), seed in any::<u64>()) {
        let name = FAILURE_TYPES[i];
        let (bytes, unknown) = generate(name, seed);
        check_edits(name, &bytes, &unknown);
    }
}

#[test]
fn edits_on_every_workflow_service_type() {
    let mut failures = 0;
    for (i, name) in workflow_service_types().iter().enumerate() {
        for seed in 0..3 {
            let (bytes, unknown) = generate(name, i as u64 * 77 + seed);
            failures += check_edits(name, &bytes, &unknown);
        }
    }
    // The generator really produces failures with something to edit.
    assert!(failures > 50, "only {failures} failures edited");
}

/// Writes the `failures` fuzz seed corpus: `PGW_WRITE_CORPUS=1 cargo test -p
/// payload-gateway-proto --test failures write_failures_corpus -- --ignored`.
#[test]
#[ignore]
fn write_failures_corpus() {
    if std::env::var_os("PGW_WRITE_CORPUS").is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/failures");
    std::fs::create_dir_all(&dir).unwrap();
    let types = payload_gateway_proto::fuzzing::fuzz_types();
    let write = |name: &str, tag: &str, bytes: &[u8]| {
        let idx = types.iter().position(|t| *t == ty(name)).unwrap() as u8;
        let mut data = vec![idx];
        data.extend_from_slice(bytes);
        let short = name.rsplit('.').next().unwrap();
        std::fs::write(dir.join(format!("{short}-{tag}")), data).unwrap();
    };
    // Hand-built: a cause chain, one with attributes, an Any, an envelope.
    let chain = app_failure("a", "s", Some(app_failure("b", "", None)));
    write(
        "temporal.api.workflowservice.v1.RespondActivityTaskFailedRequest",
        "chain",
        &ws::RespondActivityTaskFailedRequest {
            failure: Some(chain),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let mut with_attrs = app_failure(ENCODED_FAILURE_MESSAGE, "", None);
    with_attrs.encoded_attributes = Some(p("{}"));
    write(
        "temporal.api.workflowservice.v1.RespondActivityTaskFailedRequest",
        "attrs",
        &ws::RespondActivityTaskFailedRequest {
            failure: Some(with_attrs),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let rejection = update::Rejection {
        failure: Some(app_failure("r", "", None)),
        ..Default::default()
    };
    write(
        "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest",
        "any",
        &ws::RespondWorkflowTaskCompletedRequest {
            messages: vec![with_body(
                protocol::Message::default(),
                "type.googleapis.com/temporal.api.update.v1.Rejection",
                rejection.encode_to_vec(),
            )],
            ..Default::default()
        }
        .encode_to_vec(),
    );
    // Generated, small.
    for (k, name) in FAILURE_TYPES.iter().enumerate() {
        for seed in 0..2u64 {
            let (bytes, _) = generate(name, 5000 + k as u64 * 10 + seed);
            if bytes.len() <= 6000 {
                write(name, &format!("gen{seed}"), &bytes);
            }
        }
    }
}

// ------------------------------------------------------------------ failure texts

/// `google.rpc.Status` and `google.protobuf.Any`, declared here (the generated ones use a
/// `prost-types` flavour this crate does not depend on).
#[derive(Clone, PartialEq, prost::Message)]
struct RpcAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<RpcAny>,
}

fn query_failed(
    error_message: &str,
    failure: Option<failure::Failure>,
) -> ws::RespondQueryTaskCompletedRequest {
    ws::RespondQueryTaskCompletedRequest {
        task_token: b"tok".to_vec(),
        completed_type: 2, // QUERY_RESULT_TYPE_FAILED
        error_message: error_message.into(),
        namespace: "ns".into(),
        failure,
        ..Default::default()
    }
}

#[test]
fn query_error_message_is_a_text_of_its_failure_and_is_replaced_with_it() {
    let name = "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest";
    let f = app_failure("query secret", "stack", None);
    let req = query_failed("query secret", Some(f.clone()));
    let bytes = Bytes::from(req.encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    assert_eq!(s.failure_texts().len(), 1);
    let text = &s.failure_texts()[0];
    assert_eq!(text.path(), "error_message");
    assert_eq!(&bytes[text.value()], b"query secret");
    assert_eq!(text.failures(), [0]);
    assert_eq!(s.failures()[0].path().to_string(), "failure");

    // Seal the failure and the text in one splice.
    let none = vec![None; s.sites().len()];
    let sealed_bytes = s
        .splice_edits(
            &bytes,
            &none,
            &seal_all(&s, &bytes),
            &[Some(ENCODED_FAILURE_MESSAGE.into())],
        )
        .unwrap();
    let got = ws::RespondQueryTaskCompletedRequest::decode(&sealed_bytes[..]).unwrap();
    let mut want = req.clone();
    want.error_message = ENCODED_FAILURE_MESSAGE.into();
    want.failure = Some(sealed(&f));
    assert_eq!(got, want);

    // And back.
    let again = scan(ty(name), &sealed_bytes).unwrap();
    assert_eq!(again.failure_texts()[0].failures(), [0]);
    let restore = vec![Some(FailureEdit::Restore {
        message: Some("query secret".into()),
        stack_trace: Some("stack".into()),
    })];
    let back = again
        .splice_edits(
            &sealed_bytes,
            &vec![None; again.sites().len()],
            &restore,
            &[Some("query secret".into())],
        )
        .unwrap();
    assert_eq!(
        ws::RespondQueryTaskCompletedRequest::decode(&back[..]).unwrap(),
        req
    );
}

#[test]
fn every_occurrence_of_a_text_is_replaced_and_an_empty_text_is_left_out() {
    let name = "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest";
    let req = query_failed("", Some(app_failure("m", "", None)));
    let mut bytes = req.encode_to_vec();
    // error_message twice, before and after the failure: the last one wins in a decoder.
    for text in [&b"first secret"[..], b"second secret"] {
        bytes.push(4 << 3 | 2);
        bytes.push(text.len() as u8);
        bytes.extend_from_slice(text);
    }
    let bytes = Bytes::from(bytes);
    let s = scan(ty(name), &bytes).unwrap();
    assert_eq!(&bytes[s.failure_texts()[0].value()], b"second secret");
    let none = vec![None; s.sites().len()];
    let no_edits = vec![None; s.failures().len()];
    let out = s
        .splice_edits(&bytes, &none, &no_edits, &[Some("placeholder".into())])
        .unwrap();
    assert!(!out.windows(6).any(|w| w == b"secret"));
    let got = ws::RespondQueryTaskCompletedRequest::decode(&out[..]).unwrap();
    assert_eq!(got.error_message, "placeholder");
    assert_eq!(got.failure, req.failure);
    let out = s
        .splice_edits(&bytes, &none, &no_edits, &[Some("".into())])
        .unwrap();
    assert_eq!(
        ws::RespondQueryTaskCompletedRequest::decode(&out[..]).unwrap(),
        req
    );
    // The text and edit counts must match.
    assert!(matches!(
        s.splice_edits(&bytes, &none, &no_edits, &[]),
        Err(WalkError::EditCount { .. })
    ));
}

#[test]
fn a_text_without_a_failure_has_no_sibling() {
    let name = "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest";
    let bytes = Bytes::from(query_failed("lonely secret", None).encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    assert_eq!(s.failure_texts().len(), 1);
    assert!(s.failure_texts()[0].failures().is_empty());
    // A failure with nothing the walker records (no message, stack or attributes) is no
    // sibling either.
    let empty = failure::Failure {
        source: "x".into(),
        ..Default::default()
    };
    let bytes = Bytes::from(query_failed("lonely secret", Some(empty)).encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    assert!(s.failures().is_empty());
    assert!(s.failure_texts()[0].failures().is_empty());
}

#[test]
fn legacy_query_results_inside_a_workflow_task_completion_are_texts_with_their_failures() {
    use temporalio_protos::protos::temporal::api::query::v1 as query;
    let name = "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";
    let result = |m: &str| query::WorkflowQueryResult {
        result_type: 2,
        error_message: m.into(),
        failure: Some(app_failure(m, "", None)),
        ..Default::default()
    };
    let answered = query::WorkflowQueryResult {
        result_type: 1,
        answer: Some(Payloads {
            payloads: vec![p("answer")],
        }),
        ..Default::default()
    };
    let req = ws::RespondWorkflowTaskCompletedRequest {
        task_token: b"tok".to_vec(),
        namespace: "ns".into(),
        query_results: [
            ("q1".to_string(), result("first secret")),
            ("q2".to_string(), answered),
            ("q3".to_string(), result("third secret")),
        ]
        .into(),
        ..Default::default()
    };
    let bytes = Bytes::from(req.encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    assert_eq!(s.failure_texts().len(), 2);
    for text in s.failure_texts() {
        assert_eq!(text.path(), "query_results.error_message");
        assert_eq!(text.failures().len(), 1);
        let f = &s.failures()[text.failures()[0]];
        assert_eq!(f.path().to_string(), "query_results.failure");
        // The text and its own failure, not the other entry's.
        assert_eq!(bytes[text.value()], bytes[f.message().unwrap()]);
    }
    let texts: Vec<_> = s
        .failure_texts()
        .iter()
        .map(|_| Some(ENCODED_FAILURE_MESSAGE.into()))
        .collect();
    let reps: Vec<_> = s
        .sites()
        .iter()
        .map(|x| {
            let mut p = Payload::decode(&bytes[x.range()]).unwrap();
            p.data.extend_from_slice(b" (encoded)");
            Some(Bytes::from(p.encode_to_vec()))
        })
        .collect();
    let out = s
        .splice_edits(&bytes, &reps, &seal_all(&s, &bytes), &texts)
        .unwrap();
    let got = ws::RespondWorkflowTaskCompletedRequest::decode(&out[..]).unwrap();
    for (k, m) in [("q1", "first secret"), ("q3", "third secret")] {
        let r = &got.query_results[k];
        assert_eq!(r.error_message, ENCODED_FAILURE_MESSAGE);
        assert_eq!(
            r.failure,
            Some(sealed(&result(m).failure.unwrap())).map(|mut f| {
                if let Some(failure::failure::FailureInfo::ApplicationFailureInfo(a)) =
                    f.failure_info.as_mut()
                {
                    a.details.as_mut().unwrap().payloads[0]
                        .data
                        .extend_from_slice(b" (encoded)");
                }
                f
            })
        );
    }
    assert_eq!(
        got.query_results["q2"].answer.as_ref().unwrap().payloads[0].data,
        b"answer (encoded)"
    );
}

#[test]
fn a_failed_query_status_message_is_a_text_of_the_query_failed_failure() {
    use temporalio_protos::protos::temporal::api::errordetails::v1::QueryFailedFailure;
    let any = |type_name: &str, value: Vec<u8>| RpcAny {
        type_url: format!("type.googleapis.com/{type_name}"),
        value,
    };
    let f = sealed(&app_failure("query secret", "", None));
    let status = RpcStatus {
        code: 3,
        message: ENCODED_FAILURE_MESSAGE.into(),
        details: vec![any(
            "temporal.api.errordetails.v1.QueryFailedFailure",
            QueryFailedFailure {
                failure: Some(f.clone()),
            }
            .encode_to_vec(),
        )],
    };
    let bytes = Bytes::from(status.encode_to_vec());
    let s = scan(ty("google.rpc.Status"), &bytes).unwrap();
    assert_eq!(s.failure_texts().len(), 1);
    let text = &s.failure_texts()[0];
    assert_eq!(text.path(), "message");
    assert_eq!(text.failures(), [0]);
    let restore = vec![Some(FailureEdit::Restore {
        message: Some("query secret".into()),
        stack_trace: None,
    })];
    let out = s
        .splice_edits(
            &bytes,
            &vec![None; s.sites().len()],
            &restore,
            &[Some("query secret".into())],
        )
        .unwrap();
    let got = RpcStatus::decode(&out[..]).unwrap();
    assert_eq!(got.message, "query secret");
    let detail = QueryFailedFailure::decode(&got.details[0].value[..]).unwrap();
    assert_eq!(detail.failure.unwrap().message, "query secret");

    // A failure in another detail type is not the status message's sibling.
    let other = RpcStatus {
        code: 3,
        message: "m".into(),
        details: vec![any(
            "temporal.api.failure.v1.Failure",
            app_failure("m", "", None).encode_to_vec(),
        )],
    };
    let bytes = Bytes::from(other.encode_to_vec());
    let s = scan(ty("google.rpc.Status"), &bytes).unwrap();
    assert_eq!(s.failures().len(), 1);
    assert!(s.failure_texts()[0].failures().is_empty());
}

#[test]
fn a_text_edit_can_add_the_failure_beside_it() {
    use payload_gateway_proto::TextEdit;
    let name = "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest";
    let bytes = Bytes::from(query_failed("lonely secret", None).encode_to_vec());
    let s = scan(ty(name), &bytes).unwrap();
    assert!(s.failure_texts()[0].can_add_failure());
    let added = sealed(&app_failure("lonely secret", "", None));
    let edit = TextEdit {
        text: ENCODED_FAILURE_MESSAGE.into(),
        failure: Some(Bytes::from(added.encode_to_vec())),
    };
    let out = s
        .splice_edits(&bytes, &[], &[], &[Some(edit.clone())])
        .unwrap();
    let got = ws::RespondQueryTaskCompletedRequest::decode(&out[..]).unwrap();
    assert_eq!(got.error_message, ENCODED_FAILURE_MESSAGE);
    assert_eq!(got.failure, Some(added));
    // The status message's failure lives inside a detail: none can be added there.
    let status = RpcStatus {
        code: 3,
        message: "m".into(),
        details: vec![],
    };
    let bytes = Bytes::from(status.encode_to_vec());
    let s = scan(ty("google.rpc.Status"), &bytes).unwrap();
    assert!(!s.failure_texts()[0].can_add_failure());
    assert!(matches!(
        s.splice_edits(&bytes, &[], &[], &[Some(edit)]),
        Err(WalkError::BadEdit { .. })
    ));
}
