//! Payload Gateway: a gRPC sidecar between Temporal SDKs and a Temporal server that encrypts,
//! compresses and offloads every payload on the way out and restores it on the way back.
//!
//! The request path is a tower stack over a pooled HTTP/2 [`upstream::Upstream`]:
//! [`server`] accepts client connections, [`auth`] authenticates, the [`ingress`] reads each
//! request once and decides its method and namespace, [`auth`] authorizes that decision, the
//! payload [`rewrite`] layer walks each message with `payload_gateway_proto` and hands the
//! payloads to the codec, and the upstream forwards exactly the bytes that were decided on.
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod buffers;
pub mod codec;
pub mod codec_server;
pub mod config;
pub mod drain;
pub mod errors;
pub mod grpc;
pub mod ingress;
pub mod kms;
pub mod listener;
pub mod metrics;
pub mod non_grpc;
pub mod observe;
pub mod payload;
pub mod policy;
pub mod rewrite;
pub mod search_attributes;
pub mod server;
pub mod server_limits;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod upstream;
