//! The reconcile core: desired state in, rows out. One transaction per change writes the rows,
//! bumps the configuration generation and NOTIFYs the nodes.

use sqlx::PgPool;

use crate::source::{DesiredState, ResourceKey};

/// Errors of a reconcile pass. A failed pass wrote nothing (its transaction rolled back) and can
/// be retried as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("database unavailable during reconcile: {0}")]
    Database(#[from] sqlx::Error),
}

/// What a reconcile pass did.
#[derive(Debug, Clone, Default)]
pub struct ReconcileReport {
    /// The configuration generation after the pass (unchanged when nothing changed).
    pub generation: i64,
    /// Resources whose rows were written.
    pub changed: Vec<ResourceKey>,
    /// Resources whose rows were deleted.
    pub deleted: Vec<ResourceKey>,
    /// Resources that are not ready, with reason and message.
    pub not_ready: Vec<(ResourceKey, String, String)>,
}

/// Writes desired state into Postgres.
#[derive(Clone)]
pub struct Reconciler {
    pool: PgPool,
}

impl Reconciler {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Converges the database to `state`, the complete desired state of a source.
    pub async fn reconcile_all(&self, state: &DesiredState) -> Result<ReconcileReport, ReconcileError> {
        let _ = (&self.pool, state);
        todo!()
    }
}
