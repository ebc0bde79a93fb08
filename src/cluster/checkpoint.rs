//! The node's checkpoint: the last applied stream sequence, on disk.
//!
//! One small JSON file, replaced atomically: written to `<path>.tmp`, synced,
//! renamed over `<path>`, and the directory synced, so a crash leaves either
//! the old checkpoint or the new one, never a torn file. It names the stream
//! and the stream's creation time, so a checkpoint of a deleted and recreated
//! stream (whose sequences start again at 1) is not taken for this one.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::CheckpointError;

/// What a checkpoint file holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Checkpoint {
    pub(crate) version: u32,
    /// The stream's name.
    pub(crate) stream: String,
    /// The stream's creation time, nanoseconds since the Unix epoch.
    pub(crate) stream_created_ns: i128,
    /// The last stream sequence applied to (and persisted by) the node state.
    pub(crate) applied: u64,
}

pub(crate) const VERSION: u32 = 1;

/// Reads the checkpoint at `path`; `Ok(None)` when there is none.
pub(crate) fn read(path: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CheckpointError::Io(path.to_path_buf(), e)),
    };
    let cp: Checkpoint = serde_json::from_slice(&bytes)
        .map_err(|e| CheckpointError::Corrupt(path.to_path_buf(), e.to_string()))?;
    if cp.version != VERSION {
        return Err(CheckpointError::Corrupt(
            path.to_path_buf(),
            format!("unknown version {}", cp.version),
        ));
    }
    Ok(Some(cp))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `cp` to `path` atomically (write, sync, rename, sync directory).
pub(crate) fn write(path: &Path, cp: &Checkpoint) -> Result<(), CheckpointError> {
    let io = |e| CheckpointError::Io(path.to_path_buf(), e);
    let tmp = tmp_path(path);
    let bytes = serde_json::to_vec(cp)
        .map_err(|e| CheckpointError::Corrupt(path.to_path_buf(), e.to_string()))?;
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Make the rename itself durable.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_and_refuse_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.checkpoint");
        assert_eq!(read(&path).unwrap(), None);
        let cp = Checkpoint {
            version: VERSION,
            stream: "s".into(),
            stream_created_ns: 42,
            applied: 7,
        };
        write(&path, &cp).unwrap();
        assert_eq!(read(&path).unwrap(), Some(cp.clone()));
        let next = Checkpoint { applied: 9, ..cp };
        write(&path, &next).unwrap();
        assert_eq!(read(&path).unwrap(), Some(next));
        assert!(!tmp_path(&path).exists());
        std::fs::write(&path, b"{\"version\":1").unwrap();
        assert!(matches!(read(&path), Err(CheckpointError::Corrupt(..))));
        std::fs::write(
            &path,
            br#"{"version":2,"stream":"s","stream_created_ns":1,"applied":1}"#,
        )
        .unwrap();
        assert!(matches!(read(&path), Err(CheckpointError::Corrupt(..))));
    }
}
