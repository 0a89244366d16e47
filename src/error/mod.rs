//! Error types, one per concern, each with predicates to branch on: a
//! task's ([`TaskError`]), a pool's ([`PoolError`], with the settings'
//! [`ConfigError`]) and a model store's ([`StoreError`]).

mod pipeline;
mod pool;
mod store;
mod task;

pub use pipeline::{PipelineError, StageKind};
pub use pool::{ConfigError, PoolError};
pub use procpool_worker::wire::ExitInfo;
pub use store::StoreError;
#[cfg(feature = "cluster")]
pub(crate) use task::DeathParts;
pub use task::TaskError;
pub(crate) use task::{Death, describe_exit};
