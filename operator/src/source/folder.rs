//! The manifest-folder source of local mode: every `*.yaml`/`*.yml` file under a directory.

use std::path::PathBuf;

use async_trait::async_trait;

use super::{DesiredState, DesiredStateSource, SourceError};

/// Reads the YAML manifests of a folder (recursively): Trunk, PhoneNumber, RoutingRule and Secret.
pub struct FolderSource {
    dir: PathBuf,
}

impl FolderSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

#[async_trait]
impl DesiredStateSource for FolderSource {
    fn describe(&self) -> String {
        format!("folder {}", self.dir.display())
    }

    async fn desired_state(&self) -> Result<DesiredState, SourceError> {
        todo!()
    }
}
