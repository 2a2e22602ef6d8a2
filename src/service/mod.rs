//! The service layer: the Authorize path and the key lifecycle, over the cache,
//! the store and the domain rules. Knows nothing of gRPC.

pub mod analytics;
pub mod audit;
pub mod authorize;
pub mod caller;
pub mod keys;
pub mod limits;
pub mod organizations;
mod page;
pub mod replicas;
pub mod shared_limits;
pub mod usage;
pub mod watch;

pub use authorize::{AuthorizeInput, Authorizer, Outcome};
pub use caller::Caller;
pub use keys::{KeyService, ListSpec, NewKeySpec};
