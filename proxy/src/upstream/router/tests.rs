//! The routing decision on requests the ingress decided, and the router as a service.

use bytes::Bytes;
use prost::Message;
use temporalio_protos::temporal::api::workflowservice::v1::{
    DescribeNamespaceRequest, GetSystemInfoRequest, ListNamespacesRequest,
    StartWorkflowExecutionRequest,
};

use super::*;
use crate::budget::MessageBudget;
use crate::grpc::frame::Encoding;
use crate::grpc::frame::tests::frame;

const WS: &str = "/temporal.api.workflowservice.v1.WorkflowService/";

/// A config whose default upstream is `default`, with `[upstreams.one]` and
/// `[upstreams.two]` and namespaces `a` → one, `b` → two (`c` unbound).
fn config(default: &str, one: &str, two: &str) -> Config {
    Config::from_toml(
        &format!(
            "[proxy]\nupstream = \"{default}\"\n\
             [upstreams.one]\naddress = \"{one}\"\n\
             [upstreams.two]\naddress = \"{two}\"\nconnect_timeout_ms = 700\n\
             [namespaces.a]\nupstream = \"one\"\n\
             [namespaces.b]\nupstream = \"two\"\n\
             [namespaces.c]\nencryption = false\n"
        ),
        Vec::new(),
    )
    .unwrap()
}

fn router() -> Router {
    Router::from_config(&config("10.0.0.1:7233", "10.0.0.2:7233", "10.0.0.3:7233")).unwrap()
}

/// What the ingress decides about `message` sent to `method`.
fn inspected(method: &str, message: &[u8]) -> Inspected {
    let path = format!("{WS}{method}");
    crate::ingress::decide(
        &path,
        &Bytes::from(frame(0, message)),
        Encoding::Identity,
        4 << 20,
        MessageBudget::unlimited(),
    )
    .unwrap()
}

fn start(namespace: &str) -> Vec<u8> {
    StartWorkflowExecutionRequest {
        namespace: namespace.to_owned(),
        workflow_id: "wf".to_owned(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn route(router: &Router, method: &str, message: &[u8]) -> Result<Route, RouteError> {
    router.route(Some(&inspected(method, message)), &format!("{WS}{method}"))
}

#[test]
fn namespaces_go_to_their_upstream_and_the_rest_to_the_default() {
    let r = router();
    assert!(r.is_routing());
    let at = |route: Route| r.upstream(route).authority().to_string();
    assert_eq!(
        at(route(&r, "StartWorkflowExecution", &start("a")).unwrap()),
        "10.0.0.2:7233"
    );
    assert_eq!(
        at(route(&r, "StartWorkflowExecution", &start("b")).unwrap()),
        "10.0.0.3:7233"
    );
    // Unbound, empty: the default.
    for ns in ["c", "other", ""] {
        assert_eq!(
            route(&r, "StartWorkflowExecution", &start(ns)).unwrap(),
            Route::Default,
            "{ns:?}"
        );
    }
    // The gateway's own calls about a namespace take the same decision.
    assert_eq!(r.for_namespace("a").authority().as_str(), "10.0.0.2:7233");
    assert_eq!(r.for_namespace("b").authority().as_str(), "10.0.0.3:7233");
    assert_eq!(r.for_namespace("c").authority().as_str(), "10.0.0.1:7233");
    assert_eq!(r.name(r.route_of_namespace("b")), "two");
    assert_eq!(r.name(Route::Default), "default");
    assert_eq!(
        r.describe(),
        vec![
            ("default".to_owned(), "10.0.0.1:7233".to_owned()),
            ("one".to_owned(), "10.0.0.2:7233".to_owned()),
            ("two".to_owned(), "10.0.0.3:7233".to_owned()),
        ]
    );
}

#[test]
fn namespace_less_methods_go_to_the_default() {
    let r = router();
    let info = GetSystemInfoRequest::default().encode_to_vec();
    assert_eq!(route(&r, "GetSystemInfo", &info), Ok(Route::Default));
    let list = ListNamespacesRequest::default().encode_to_vec();
    assert_eq!(route(&r, "ListNamespaces", &list), Ok(Route::Default));
    // Describing a namespace by name follows the name.
    let describe = DescribeNamespaceRequest {
        namespace: "b".into(),
        ..Default::default()
    }
    .encode_to_vec();
    assert_eq!(
        route(&r, "DescribeNamespace", &describe),
        Ok(r.route_of_namespace("b"))
    );
    // gRPC health checks carry no namespace.
    let path = "/grpc.health.v1.Health/Check";
    let health = Inspected {
        method: None,
        messages: None,
        namespace: None,
        target: crate::ingress::target::of_path(path),
        nested_namespaces: Ok(Vec::new()),
        task_namespace_id: Ok(None),
        budget: MessageBudget::unlimited(),
    };
    assert_eq!(r.route(Some(&health), path), Ok(Route::Default));
}

#[test]
fn what_cannot_be_routed_is_refused_not_sent_to_the_default() {
    let r = router();
    // By id only.
    let by_id = DescribeNamespaceRequest {
        id: "0b1c".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let err = route(&r, "DescribeNamespace", &by_id).unwrap_err();
    assert!(matches!(err, RouteError::ById(_)), "{err:?}");
    assert_eq!(err.status().code, Code::FailedPrecondition);
    assert!(err.to_string().contains("by id"), "{err}");
    // A Temporal method the descriptors do not know.
    let path = "/temporal.api.workflowservice.v1.WorkflowService/InventedMethod";
    let unknown = crate::ingress::decide(
        path,
        &Bytes::from(frame(0, &start("a"))),
        Encoding::Identity,
        4 << 20,
        MessageBudget::unlimited(),
    )
    .unwrap();
    let err = r.route(Some(&unknown), path).unwrap_err();
    assert_eq!(err, RouteError::UnknownMethod(path.to_owned()));
    assert_eq!(err.status().code, Code::Unimplemented);
    // No decision of the ingress at all.
    let err = r
        .route(None, &format!("{WS}StartWorkflowExecution"))
        .unwrap_err();
    assert_eq!(err, RouteError::NotInspected);
    assert_eq!(err.status().code, Code::Internal);
}

#[test]
// The commands' `namespace` fields are deprecated in the API: still what the server reads.
#[allow(deprecated)]
fn cross_namespace_commands_cannot_cross_upstreams() {
    use temporalio_protos::temporal::api::command::v1::{
        Command, SignalExternalWorkflowExecutionCommandAttributes, command,
    };
    use temporalio_protos::temporal::api::workflowservice::v1::RespondWorkflowTaskCompletedRequest;
    let r = router();
    let completion = |namespace: &str, signalled: &str| {
        RespondWorkflowTaskCompletedRequest {
            namespace: namespace.into(),
            commands: vec![Command {
                attributes: Some(
                    command::Attributes::SignalExternalWorkflowExecutionCommandAttributes(
                        SignalExternalWorkflowExecutionCommandAttributes {
                            namespace: signalled.into(),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec()
    };
    // `c` and `other` are both served by the default: allowed.
    assert_eq!(
        route(
            &r,
            "RespondWorkflowTaskCompleted",
            &completion("c", "other")
        ),
        Ok(Route::Default)
    );
    // The default's workflow naming `b` (served by `two`) would reach the default's own `b`.
    let err = route(&r, "RespondWorkflowTaskCompleted", &completion("c", "b")).unwrap_err();
    assert!(
        matches!(&err, RouteError::CrossUpstream { nested, nested_upstream, .. }
        if nested == "b" && nested_upstream == "two"),
        "{err:?}"
    );
    assert_eq!(err.status().code, Code::FailedPrecondition);
    let err = route(&r, "RespondWorkflowTaskCompleted", &completion("a", "b")).unwrap_err();
    assert!(matches!(err, RouteError::CrossUpstream { .. }), "{err:?}");
}

#[test]
fn without_bindings_everything_goes_to_the_default() {
    let mut c = config("10.0.0.1:7233", "10.0.0.2:7233", "10.0.0.3:7233");
    for over in c.namespaces.values_mut() {
        over.upstream = None;
    }
    let r = Router::from_config(&c).unwrap();
    assert!(!r.is_routing());
    assert_eq!(r.route(None, "/anything"), Ok(Route::Default));
    assert_eq!(r.for_namespace("a").authority().as_str(), "10.0.0.1:7233");
    let single = Router::single(Upstream::new(&c.proxy).unwrap());
    assert!(!single.is_routing());
}

/// A loopback port nothing listens on (bound, then closed).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn grpc_message(response: Response<GatewayBody>) -> (String, String) {
    let headers = response.headers();
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    (get("grpc-status"), get("grpc-message"))
}

#[tokio::test]
async fn the_service_forwards_to_the_upstream_its_route_names() {
    use tower::ServiceExt;
    let (default, one, two) = (closed_port(), closed_port(), closed_port());
    let r = Router::from_config(&config(
        &format!("127.0.0.1:{default}"),
        &format!("127.0.0.1:{one}"),
        &format!("127.0.0.1:{two}"),
    ))
    .unwrap()
    .with_own_pools();
    let request = |route: Option<Route>| {
        let mut request = Request::post(format!("{WS}StartWorkflowExecution"))
            .body(GatewayBody::buffered(Vec::new(), None))
            .unwrap();
        if let Some(route) = route {
            request.extensions_mut().insert(route);
        }
        request
    };
    // Each route reaches its own upstream: the refusal names its address.
    for (route, port) in [
        (Route::Default, default),
        (r.route_of_namespace("a"), one),
        (r.route_of_namespace("b"), two),
    ] {
        let response = r.clone().oneshot(request(Some(route))).await.unwrap();
        let (status, message) = grpc_message(response).await;
        assert_eq!(status, "14", "{message}");
        assert!(
            message.contains(&format!("127.0.0.1:{port}")),
            "{route:?}: {message}"
        );
    }
    // With bindings, a request without a route never goes anywhere.
    let response = r.clone().oneshot(request(None)).await.unwrap();
    let (status, message) = grpc_message(response).await;
    assert_eq!(status, "13", "{message}");
}
