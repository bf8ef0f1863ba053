//! gRPC over HTTP/2 as the gateway sees it: bodies, message framing and statuses.

pub mod body;
pub mod frame;
pub mod layer;
pub mod status;

pub use body::{BoxError, GatewayBody};
pub use status::{Code, Status};
