//! Helpers shared by the integration tests (`mod common;`): a test PKI made with `rcgen`
//! ([`pki`]) and an in-process upstream that records what it receives ([`upstream`]).

// Each test binary uses a part of these helpers.
#![allow(dead_code)]

pub mod pki;
pub mod upstream;
