//! The ids of namespaces, as the server knows them: the server acts on the namespace id inside
//! a task token, not on the request's `namespace` field, so authorizing a task completion
//! means comparing that id with the id of the namespace the caller was authorized for.
//!
//! Ids are read with `DescribeNamespace` over the gateway's own connection to the upstream
//! that serves the namespace ([`Router::for_namespace`]) and cached by name. A cached id that disagrees with a token is looked up once more before the
//! request is refused (a namespace deleted and created again under its name gets a new id).
//! When the server cannot be asked, the request fails with `UNAVAILABLE`: never allowed on a
//! guess.

use bytes::Bytes;
use payload_gateway_proto::{len_fields_by_number, string_field_by_number};

use crate::upstream::Router;
use crate::upstream::client::{self, CallError};

/// `DescribeNamespaceResponse.namespace_info` and `NamespaceInfo.id`.
const NAMESPACE_INFO_FIELD: u32 = 1;
const NAMESPACE_ID_FIELD: u32 = 6;
/// Names remembered at most.
const CAPACITY: usize = 10_000;

/// Why a namespace id could not be found.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The server did not answer, or answered with an error.
    #[error("cannot look up the id of namespace {namespace:?}: {source}")]
    Call {
        /// The namespace.
        namespace: String,
        /// What the call returned.
        source: CallError,
    },
    /// The answer names no id.
    #[error("the server's description of namespace {0:?} carries no id")]
    NoId(String),
}

/// Namespace name → id, read from the server and cached.
#[derive(Debug)]
pub struct NamespaceIds {
    router: Router,
    cache: quick_cache::sync::Cache<String, String>,
}

impl NamespaceIds {
    /// Looks ids up at the upstream `router` names for each namespace.
    pub fn new(router: Router) -> Self {
        Self {
            router,
            cache: quick_cache::sync::Cache::new(CAPACITY),
        }
    }

    /// Whether `id` is the id of `namespace` (asking the server when the cache does not
    /// already say yes).
    pub async fn is_id_of(&self, namespace: &str, id: &str) -> Result<bool, LookupError> {
        if self.cache.get(namespace).is_some_and(|known| known == id) {
            return Ok(true);
        }
        let current = self.lookup(namespace).await?;
        let matches = current == id;
        self.cache.insert(namespace.to_owned(), current);
        Ok(matches)
    }

    async fn lookup(&self, namespace: &str) -> Result<String, LookupError> {
        let response = client::describe_namespace(self.router.for_namespace(namespace), namespace)
            .await
            .map_err(|source| LookupError::Call {
                namespace: namespace.to_owned(),
                source,
            })?;
        id_in(&response).ok_or_else(|| LookupError::NoId(namespace.to_owned()))
    }
}

/// The last `namespace_info.id` of a `DescribeNamespaceResponse` (merged parts included).
fn id_in(response: &Bytes) -> Option<String> {
    let infos = len_fields_by_number(response, NAMESPACE_INFO_FIELD).ok()?;
    infos
        .iter()
        .rev()
        .find_map(|info| {
            string_field_by_number(info, NAMESPACE_ID_FIELD)
                .ok()
                .flatten()
        })
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn the_id_is_read_from_namespace_info() {
        use temporalio_protos::temporal::api::namespace::v1::NamespaceInfo;
        use temporalio_protos::temporal::api::workflowservice::v1::DescribeNamespaceResponse;
        let response = DescribeNamespaceResponse {
            namespace_info: Some(NamespaceInfo {
                name: "a".into(),
                id: "1111-2222".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(id_in(&Bytes::from(response)).as_deref(), Some("1111-2222"));
        assert_eq!(id_in(&Bytes::new()), None);
    }
}
