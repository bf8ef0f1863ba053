//! Generates the payload schema table from the descriptor set that `temporalio-protos`
//! publishes to dependents' build scripts (`DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH`).
//!
//! Output (`$OUT_DIR/schema_table.rs`, `include!`-ed by `src/schema.rs`):
//! - every message type, sorted by full name (index = `MessageType` id), with the slice of
//!   its fields that can reach a `temporal.api.common.v1.Payload` and the slice of its
//!   singular string fields (for `top_level_string`);
//! - every gRPC method path with its request/response types.
//!
//! Nothing about the Temporal API is written here except a few well-known names.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

const PAYLOAD: &str = "temporal.api.common.v1.Payload";
/// The message the search attribute table leads to.
const SEARCH_ATTRIBUTES: &str = "temporal.api.common.v1.SearchAttributes";
const ANY: &str = "google.protobuf.Any";
/// `(message, field)` pairs that are never walked: search attributes stay plaintext.
const EXCLUDED_FIELDS: &[(&str, &str)] =
    &[("temporal.api.common.v1.SearchAttributes", "indexed_fields")];
/// `(message, endpoint field, input field)`: messages whose `input` payload is a system
/// envelope when `endpoint` is the system Nexus endpoint (see `walk.rs` docs).
const SYSTEM_NEXUS: &[(&str, &str, &str)] = &[
    (
        "temporal.api.command.v1.ScheduleNexusOperationCommandAttributes",
        "endpoint",
        "input",
    ),
    (
        "temporal.api.history.v1.NexusOperationScheduledEventAttributes",
        "endpoint",
        "input",
    ),
];

struct Msg {
    name: String,
    map_entry: bool,
    fields: Vec<(String, i32, Option<String>, bool, bool)>, // name, number, message type, is_string, repeated
}

fn collect(prefix: &str, d: &DescriptorProto, out: &mut Vec<Msg>) {
    let name = format!("{prefix}.{}", d.name());
    let name = name.trim_start_matches('.').to_string();
    let map_entry = d
        .options
        .as_ref()
        .and_then(|o| o.map_entry)
        .unwrap_or(false);
    let fields = d
        .field
        .iter()
        .map(|f| {
            let msg_ty = (f.r#type() == Type::Message || f.r#type() == Type::Group)
                .then(|| f.type_name().trim_start_matches('.').to_string());
            (
                f.name().to_string(),
                f.number(),
                msg_ty,
                // Singular length-delimited scalars, read by name at the top level: strings
                // (`namespace`, ids) and bytes (`task_token`).
                matches!(f.r#type(), Type::String | Type::Bytes),
                f.label() == Label::Repeated,
            )
        })
        .collect();
    out.push(Msg {
        name: name.clone(),
        map_entry,
        fields,
    });
    for n in &d.nested_type {
        collect(&format!(".{name}"), n, out);
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH");
    let path = std::env::var("DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH")
        .expect("temporalio-protos must publish DEP_TEMPORALIO_PROTOS_DESCRIPTOR_PATH");
    println!("cargo:rerun-if-changed={path}");
    // Lets tests and benches load the same descriptor set into prost-reflect.
    println!("cargo:rustc-env=PGW_DESCRIPTOR_PATH={path}");
    let bytes = std::fs::read(&path).expect("read descriptor set");
    let set = FileDescriptorSet::decode(bytes.as_slice()).expect("decode descriptor set");

    let mut msgs = Vec::new();
    let mut methods = BTreeMap::new();
    let mut seen_files = std::collections::HashSet::new();
    for file in &set.file {
        if !seen_files.insert(file.name().to_string()) {
            continue;
        }
        let pkg = if file.package().is_empty() {
            String::new()
        } else {
            format!(".{}", file.package())
        };
        for m in &file.message_type {
            collect(&pkg, m, &mut msgs);
        }
        for svc in &file.service {
            let svc_name = format!("{}.{}", file.package(), svc.name());
            let svc_name = svc_name.trim_start_matches('.');
            for m in &svc.method {
                methods.insert(
                    format!("/{svc_name}/{}", m.name()),
                    (
                        m.input_type().trim_start_matches('.').to_string(),
                        m.output_type().trim_start_matches('.').to_string(),
                        m.client_streaming(),
                        m.server_streaming(),
                    ),
                );
            }
        }
    }
    msgs.sort_by(|a, b| a.name.cmp(&b.name));
    msgs.dedup_by(|a, b| a.name == b.name);
    let index: HashMap<&str, usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), i))
        .collect();
    let payload = index[PAYLOAD];
    let any = index[ANY];
    assert!(msgs.len() < 0x8000, "too many message types for u16 ids");

    // Fixpoint: which messages can reach a Payload (an Any may hold any type, so it counts).
    let mut reach = vec![false; msgs.len()];
    reach[payload] = true;
    reach[any] = true;
    let excluded = |m: &str, f: &str| EXCLUDED_FIELDS.iter().any(|(em, ef)| *em == m && *ef == f);
    loop {
        let mut changed = false;
        for (i, m) in msgs.iter().enumerate() {
            if reach[i] {
                continue;
            }
            let hit = m.fields.iter().any(|(fname, _, ty, _, _)| {
                ty.as_deref()
                    .and_then(|t| index.get(t))
                    .is_some_and(|&t| reach[t] && !excluded(&m.name, fname))
            });
            if hit {
                reach[i] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }

    let mut out = String::new();
    writeln!(
        out,
        "// @generated by build.rs from the temporalio-protos descriptor set"
    )
    .unwrap();
    writeln!(out, "pub(crate) const PAYLOAD_TYPE: u16 = {payload};").unwrap();
    writeln!(out, "pub(crate) const ANY_TYPE: u16 = {any};").unwrap();
    let mut fields_src = String::new();
    let mut strings_src = String::new();
    let mut msgs_src = String::new();
    let mut names_src = String::new();
    let (mut nf, mut ns) = (0usize, 0usize);
    for (i, m) in msgs.iter().enumerate() {
        let f0 = nf;
        let s0 = ns;
        // Payload and Any are leaves handled by the walker itself.
        if i != payload && i != any {
            let mut fs: Vec<_> = m
                .fields
                .iter()
                .filter_map(|(fname, num, ty, _, _)| {
                    let t = *index.get(ty.as_deref()?)?;
                    (reach[t] && !excluded(&m.name, fname)).then_some((*num, fname, t))
                })
                .collect();
            fs.sort();
            for (num, fname, t) in fs {
                let kind = if t == payload {
                    "FieldKind::Payload"
                } else if t == any {
                    "FieldKind::Any"
                } else {
                    "FieldKind::Message"
                };
                // Map entry values are rendered as the map field itself.
                let shown = if m.map_entry { "" } else { fname.as_str() };
                writeln!(
                    fields_src,
                    "    FieldInfo {{ number: {num}, name: {shown:?}, target: {t}, kind: {kind} }},"
                )
                .unwrap();
                nf += 1;
            }
        }
        let mut ss: Vec<_> = m
            .fields
            .iter()
            .filter(|(_, _, _, is_str, rep)| *is_str && !*rep)
            .map(|(fname, num, _, _, _)| (fname.as_str(), *num))
            .collect();
        ss.sort();
        for (fname, num) in ss {
            writeln!(strings_src, "    ({fname:?}, {num}),").unwrap();
            ns += 1;
        }
        let nexus = SYSTEM_NEXUS
            .iter()
            .find(|(mn, _, _)| *mn == m.name)
            .map(|(_, ep, input)| {
                let num = |n: &str| {
                    m.fields
                        .iter()
                        .find(|f| f.0 == n)
                        .unwrap_or_else(|| panic!("{}.{n} missing", m.name))
                        .1
                };
                (num(ep), num(input))
            })
            .unwrap_or((0, 0));
        writeln!(
            msgs_src,
            "    MsgInfo {{ fields: ({f0}, {nf}), strings: ({s0}, {ns}), reach: {}, nexus: ({}, {}) }},",
            reach[i], nexus.0, nexus.1
        )
        .unwrap();
        writeln!(names_src, "    {:?},", m.name).unwrap();
    }
    writeln!(
        out,
        "pub(crate) static NAMES: [&str; {}] = [\n{names_src}];",
        msgs.len()
    )
    .unwrap();
    writeln!(
        out,
        "pub(crate) static MESSAGES: [MsgInfo; {}] = [\n{msgs_src}];",
        msgs.len()
    )
    .unwrap();
    writeln!(
        out,
        "pub(crate) static FIELDS: [FieldInfo; {nf}] = [\n{fields_src}];"
    )
    .unwrap();
    writeln!(
        out,
        "pub(crate) static STRING_FIELDS: [(&str, u32); {ns}] = [\n{strings_src}];"
    )
    .unwrap();
    write_search_attribute_table(&mut out, &msgs, &index);
    let mut methods_src = String::new();
    for (path, (req, resp, cs, ss)) in &methods {
        let (Some(r), Some(s)) = (index.get(req.as_str()), index.get(resp.as_str())) else {
            panic!("method {path}: unknown types {req} / {resp}");
        };
        writeln!(methods_src, "    ({path:?}, {r}, {s}, {cs}, {ss}),").unwrap();
    }
    writeln!(
        out,
        "pub(crate) static METHODS: [(&str, u16, u16, bool, bool); {}] = [\n{methods_src}];",
        methods.len()
    )
    .unwrap();

    let dest = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("schema_table.rs");
    std::fs::write(dest, out).expect("write schema table");
}

/// The second table: per message type, the message fields that can lead to a
/// `temporal.api.common.v1.SearchAttributes` (a fixpoint like the payload table's; `Any`
/// values are not followed). Emits `SEARCH_ATTRIBUTES_TYPE`, `SA_MESSAGES` (per type: field
/// range, reach) and `SA_FIELDS` (number, target type, name), read by `search_attributes.rs`.
fn write_search_attribute_table(out: &mut String, msgs: &[Msg], index: &HashMap<&str, usize>) {
    let target = index[SEARCH_ATTRIBUTES];
    let mut reach = vec![false; msgs.len()];
    reach[target] = true;
    loop {
        let mut changed = false;
        for (i, m) in msgs.iter().enumerate() {
            if reach[i] {
                continue;
            }
            let hit = m.fields.iter().any(|(_, _, ty, _, _)| {
                ty.as_deref()
                    .and_then(|t| index.get(t))
                    .is_some_and(|&t| reach[t])
            });
            if hit {
                reach[i] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    writeln!(
        out,
        "pub(crate) const SEARCH_ATTRIBUTES_TYPE: u16 = {target};"
    )
    .unwrap();
    let mut fields_src = String::new();
    let mut msgs_src = String::new();
    let mut nf = 0usize;
    for (i, m) in msgs.iter().enumerate() {
        let f0 = nf;
        if i != target {
            let mut fs: Vec<_> = m
                .fields
                .iter()
                .filter_map(|(fname, num, ty, _, _)| {
                    let t = *index.get(ty.as_deref()?)?;
                    reach[t].then_some((*num, t, fname))
                })
                .collect();
            fs.sort();
            for (num, t, fname) in fs {
                writeln!(fields_src, "    ({num}, {t}, {fname:?}),").unwrap();
                nf += 1;
            }
        }
        writeln!(msgs_src, "    ({f0}, {nf}, {}),", reach[i]).unwrap();
    }
    writeln!(
        out,
        "pub(crate) static SA_MESSAGES: [(u32, u32, bool); {}] = [\n{msgs_src}];",
        msgs.len()
    )
    .unwrap();
    writeln!(
        out,
        "pub(crate) static SA_FIELDS: [(u32, u16, &str); {nf}] = [\n{fields_src}];"
    )
    .unwrap();
}
