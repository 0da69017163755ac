//! What every shipper (central store, syslog, webhook) does with the local store, which is
//! its durable spool: open a reader where it left off, and record how far it got.

use std::path::Path;

use portcullis_audit_store::{Reader, StoreError};

/// Opens the spool after `shipped_upto`. Retention never deletes what a shipper has not
/// sent, so a pruned start means the progress file was lost after those records were sent:
/// the shipper resumes at the first record still stored (`Ok(None)`: call again).
pub(crate) async fn open_reader(
    dir: &Path,
    shipped_upto: &mut u64,
    shipper: &'static str,
) -> Result<Option<Reader>, StoreError> {
    let from = shipped_upto.saturating_add(1);
    let owned = dir.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || Reader::from_seq(&owned, from))
        .await
        .map_err(|e| StoreError::Io {
            path: dir.to_path_buf(),
            op: "reading the spool",
            source: std::io::Error::other(e),
        })?;
    match opened {
        Ok(r) => Ok(Some(r)),
        Err(StoreError::Pruned {
            first_available, ..
        }) => {
            tracing::warn!(
                shipper,
                from,
                first_available,
                "records before {first_available} were pruned after shipping; resuming there"
            );
            *shipped_upto = first_available.saturating_sub(1);
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Temp file, fsync, rename, fsync the directory: after a crash the file holds the old or
/// the new seq, never a torn one.
pub(crate) fn write_progress(path: &Path, seq: u64) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // Only root may move a shipper's progress: a forward jump would skip records and let
    // retention delete them unshipped. A leftover temporary file is replaced, never reused.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(file, "{seq}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}
