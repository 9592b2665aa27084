//! Replacing a file whole, for the tools that rewrite one (`plugbus dev`, `plugbus test
//! --update`): the new bytes go into a temporary file made for them beside it, then are renamed
//! over it. Never into a name already there: a link planted at a predictable name (a repo can
//! ship one) would be written through, to any file of the user's, and a FIFO would hang the
//! write.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` into `temp`, which must not exist yet (made with `O_EXCL`: whatever is at that
/// name, a link or a FIFO, is refused, never written through, and left as it is), syncs it and
/// renames it over `target`, keeping `target`'s mode when it is there (review 61g: a `0600` case
/// file came back `0644`, every local user's to read). On failure the temporary it made is
/// removed.
pub fn replace_with(temp: &Path, target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(temp)?;
    let kept_mode = match std::fs::metadata(target) {
        Ok(was) => out.set_permissions(was.permissions()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    let renamed = kept_mode
        .and_then(|()| out.write_all(bytes))
        .and_then(|()| out.sync_all())
        .and_then(|()| std::fs::rename(temp, target));
    if renamed.is_err() {
        let _ = std::fs::remove_file(temp);
    }
    renamed
}

/// A name beside `target` for its replacement: `.<file name>.<random>.<tag>`, hidden, and
/// unknown in advance. What a write killed before its rename left under such names is removed
/// first ([`remove_leftovers`]).
pub fn temp_beside(target: &Path, tag: &str) -> std::path::PathBuf {
    remove_leftovers(target, tag);
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    target.with_file_name(format!(".{name}.{:016x}.{tag}", fastrand::u64(..)))
}

/// How old a temporary must be to be taken as left by a killed write (another run may be
/// writing a younger one).
const LEFT_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes what earlier writes of `target` killed between the write and the rename left beside
/// it (each the file's size, never read): only names of [`temp_beside`]'s form for `target` and
/// `tag`, at least [`LEFT_FOR`] old, and never through a link (removing a link removes the
/// link).
fn remove_leftovers(target: &Path, tag: &str) {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let (prefix, suffix) = (format!(".{}.", name.to_string_lossy()), format!(".{tag}"));
    let now = std::time::SystemTime::now();
    for entry in entries.flatten() {
        let found = entry.file_name();
        let found = found.to_string_lossy();
        let Some(random) = found.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(&suffix)) else { continue };
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|at| now.duration_since(at).is_ok_and(|age| age >= LEFT_FOR));
        if random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit()) && old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replaced_file_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("cases.jsonl");
        std::fs::write(&target, "old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        replace_with(&dir.path().join("t"), &target, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn nothing_at_the_temporary_name_is_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let (target, victim, temp) = (dir.path().join("cases.jsonl"), dir.path().join("victim"), dir.path().join("t"));
        std::fs::write(&target, "old").unwrap();
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, &temp).unwrap();
        assert!(replace_with(&temp, &target, b"new").is_err(), "written through a link");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "old");
        assert!(std::fs::symlink_metadata(&temp).is_ok(), "the link at the name was removed");
        // What a write killed before its rename left goes, once an hour old (another run may be
        // writing a younger one); other names stay.
        let (left, young) = (
            dir.path().join(".cases.jsonl.0123456789abcdef.test"),
            dir.path().join(".cases.jsonl.fedcba9876543210.test"),
        );
        std::fs::write(&left, "half").unwrap();
        std::fs::write(&young, "being written").unwrap();
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options().write(true).open(&left).unwrap().set_modified(long_ago).unwrap();
        let fresh = temp_beside(&target, "test");
        assert!(!left.exists(), "a leftover stayed");
        assert!(young.exists(), "another run's temporary went");
        replace_with(&fresh, &target, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert!(!fresh.exists() && temp.exists() && victim.exists());
    }
}
