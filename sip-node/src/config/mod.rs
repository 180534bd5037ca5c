//! The node's configuration: an immutable [`Snapshot`] of what the operator stored in Postgres,
//! served through a [`SnapshotHandle`] and kept current by a watcher task.

pub mod disk;
mod load;
mod snapshot;
mod watcher;

pub use load::{LoadError, load_snapshot};
#[cfg(test)]
pub(crate) use snapshot::tests as fixtures;
pub use snapshot::{Snapshot, SnapshotHandle};
pub(crate) use watcher::{Watcher, listener_pool};
