//! Following the folder: a recursive, debounced watcher, and a full reconcile after every batch
//! of events that touches a manifest (or a folder that may hold manifests).

use std::path::Path;
use std::time::Duration;

use notify_debouncer_full::notify::{self, EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use switchboard_operator::reconcile::Reconciler;
use switchboard_operator::source::folder::{FolderSource, is_manifest};
use tokio::sync::mpsc;

use super::{LocalError, Shutdown, log_report, reconcile_with_retry};

/// Quiet time after a file change before the folder is reconciled.
const DEBOUNCE: Duration = Duration::from_millis(100);

type FolderWatcher = Debouncer<RecommendedWatcher, RecommendedCache>;

/// Watches `dir` recursively; debounced batches of events arrive on the receiver. The watcher
/// stops when the returned handle is dropped.
pub(super) fn watch_folder(
    dir: &Path,
) -> Result<(FolderWatcher, mpsc::UnboundedReceiver<DebounceEventResult>), LocalError> {
    let watch_error = |error| LocalError::Watch { path: dir.to_path_buf(), error };
    let (sender, receiver) = mpsc::unbounded_channel();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let _ = sender.send(result);
    })
    .map_err(watch_error)?;
    debouncer.watch(dir, RecursiveMode::Recursive).map_err(watch_error)?;
    Ok((debouncer, receiver))
}

/// Re-runs the full reconcile after every relevant change until shutdown is requested.
pub(super) async fn follow_changes(
    source: &FolderSource,
    reconciler: &Reconciler,
    changes: &mut mpsc::UnboundedReceiver<DebounceEventResult>,
    shutdown: &mut Shutdown,
) {
    loop {
        let batch = tokio::select! {
            batch = changes.recv() => batch,
            () = shutdown.requested() => return,
        };
        let Some(batch) = batch else {
            // The watcher is gone; nothing more to follow.
            return shutdown.requested().await;
        };
        // Coalesce everything that queued up meanwhile into one pass.
        let mut relevant = batch_is_relevant(batch);
        while let Ok(more) = changes.try_recv() {
            relevant |= batch_is_relevant(more);
        }
        if !relevant {
            continue;
        }
        match reconcile_with_retry(source, reconciler, shutdown).await {
            Ok(Some(pass)) => log_report(&pass.report),
            Ok(None) => return,
            Err(error) => tracing::warn!("{error}; the configuration in effect stays as it is"),
        }
    }
}

/// True when a debounced batch touches manifests. Watch errors are logged and count as a
/// change (a full reconcile is harmless when nothing changed).
fn batch_is_relevant(batch: DebounceEventResult) -> bool {
    match batch {
        Ok(events) => events.iter().any(|event| is_relevant(&event.event)),
        Err(errors) => {
            for error in errors {
                tracing::warn!("watching the manifest folder: {error}");
            }
            true
        }
    }
}

/// True for a created, modified, removed or renamed `*.yaml`/`*.yml` file, and for folders
/// appearing, disappearing or being renamed (they may carry manifests).
fn is_relevant(event: &notify::Event) -> bool {
    use notify::event::{CreateKind, ModifyKind, RemoveKind};
    match event.kind {
        EventKind::Access(_) => false,
        EventKind::Create(CreateKind::Folder) | EventKind::Remove(RemoveKind::Folder) => true,
        EventKind::Modify(ModifyKind::Name(_)) => {
            event.paths.iter().any(|path| is_manifest(path) || path.extension().is_none())
        }
        _ => event.paths.iter().any(|path| is_manifest(path)),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use notify::event::{AccessKind, CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode};

    use super::*;

    fn event(kind: EventKind, paths: &[&str]) -> notify::Event {
        paths.iter().fold(notify::Event::new(kind), |event, path| event.add_path(PathBuf::from(path)))
    }

    #[test]
    fn manifest_changes_are_relevant() {
        let modify = EventKind::Modify(ModifyKind::Data(DataChange::Content));
        assert!(is_relevant(&event(modify, &["/m/trunk.yaml"])));
        assert!(is_relevant(&event(EventKind::Create(CreateKind::File), &["/m/a/rule.yml"])));
        assert!(is_relevant(&event(EventKind::Remove(RemoveKind::File), &["/m/number.yaml"])));
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(is_relevant(&event(rename, &["/m/old.txt", "/m/new.yaml"])));
        assert!(is_relevant(&event(rename, &["/m/dir", "/m/elsewhere"])));
        assert!(is_relevant(&event(EventKind::Remove(RemoveKind::Folder), &["/m/dir"])));
    }

    #[test]
    fn other_files_and_reads_are_not() {
        let modify = EventKind::Modify(ModifyKind::Data(DataChange::Content));
        assert!(!is_relevant(&event(modify, &["/m/notes.txt"])));
        assert!(!is_relevant(&event(modify, &["/m/.trunk.yaml.swp"])));
        assert!(!is_relevant(&event(EventKind::Access(AccessKind::Any), &["/m/trunk.yaml"])));
    }
}
