//! The folders and files of `data_dir` are made readable by their owner alone (review 61c L2):
//! they hold every accepted event's data, every plugin's kv and every dead letter's record, and
//! under the usual umask (022) they were made readable by every local user (`plugbus run` from a
//! shell, `plugbus dev`; the shipped systemd unit's state folder is private already). Only what
//! plugbus creates is made so: a folder or file that exists keeps the mode its operator gave it.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The mode of the folders plugbus makes under `data_dir` (and `data_dir` itself).
pub const FOLDER_MODE: u32 = 0o700;
/// The mode of the files plugbus makes there.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and the folders above it that are missing, each [`FOLDER_MODE`].
pub fn create_folder(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(FOLDER_MODE).create(dir)
}

/// Creates `path`, empty and [`FILE_MODE`], when it is missing (a database then initialises
/// it); one that exists is left as it is.
pub fn create_file(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other.map(drop),
    }
}

/// [`FILE_MODE`] for a file opened with `options`, should it create it.
pub fn private(options: &mut std::fs::OpenOptions) -> &mut std::fs::OpenOptions {
    options.mode(FILE_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn what_it_creates_only_its_owner_reads_and_what_exists_keeps_its_mode() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("a/b");
        create_folder(&data).unwrap();
        assert_eq!((mode(&root.path().join("a")), mode(&data)), (FOLDER_MODE, FOLDER_MODE));
        let file = data.join("bus.redb");
        create_file(&file).unwrap();
        assert_eq!(mode(&file), FILE_MODE);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        create_file(&file).unwrap();
        create_folder(&data).unwrap();
        assert_eq!(mode(&file), 0o640, "an existing file keeps its mode");
    }
}
