//! Writing files the user asked for (flow files, proposals, artefacts, state): atomically, so a
//! reader never sees half a file and a failed write keeps the old one — and never by replacing a
//! device, FIFO or symlink.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use crate::error::{Error, InputError};

/// Checks, before any work is done, that `path` (given with `flag`) can be written: its
/// directory exists, and it is not a directory, a dangling symlink or a symlink loop.
pub fn check_output(flag: &str, path: &Path) -> Result<(), InputError> {
    let origin = format!("{flag} {}", path.display());
    let resolved = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::canonicalize(path) {
            Ok(target) => target,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(InputError::new(origin, "is a symlink loop; give a file name"));
            }
            Err(_) => {
                let target = std::fs::read_link(path).unwrap_or_default();
                return Err(InputError::new(
                    origin,
                    format!(
                        "is a symlink to {}, which does not exist; create it, or remove the link",
                        target.display()
                    ),
                ));
            }
        },
        _ => path.to_path_buf(),
    };
    if resolved.is_dir() {
        return Err(InputError::new(origin, "is a directory; give a file name"));
    }
    let dir = resolved.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(InputError::new(origin, format!("directory {} does not exist", dir.display())));
    }
    Ok(())
}

/// Writes through a temporary file in the same directory and renames it into place, so a
/// reader never sees half a file and an existing file survives a failed write.
pub fn write_atomically(path: &Path, contents: &str) -> Result<(), Error> {
    fn failed(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
        move |source| Error::Write { path: path.to_path_buf(), source }
    }
    // Renaming a temporary file over a device, FIFO or socket (`--output /dev/null`, a pipe)
    // would replace the node itself: those are written in place. A symlink is followed, so the
    // file it points to is replaced, not the link.
    let resolved: PathBuf = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path).map_err(failed(path))?,
        _ => path.to_path_buf(),
    };
    let path = resolved.as_path();
    if let Ok(meta) = std::fs::metadata(path)
        && !meta.is_file()
    {
        if meta.is_dir() {
            return Err(InputError::new(path.display().to_string(), "is a directory; give a file name").into());
        }
        let mut f = std::fs::OpenOptions::new().write(true).open(path).map_err(failed(path))?;
        return f.write_all(contents.as_bytes()).map_err(failed(path));
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(failed(path))?;
    tmp.write_all(contents.as_bytes()).map_err(failed(path))?;
    tmp.as_file().sync_all().map_err(failed(path))?;
    tmp.persist(path).map_err(|e| failed(path)(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_never_replace_a_fifo_or_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
        };
        write_atomically(&fifo, "through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), "through the pipe");
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::symlink_metadata(&fifo).unwrap().file_type()));

        let target = dir.path().join("flows.json");
        std::fs::write(&target, "old").unwrap();
        let link = dir.path().join("latest.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_atomically(&link, "new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        // Nothing but the three entries: no temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn output_problems_name_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere/x.json"), &dangling).unwrap();
        let e = check_output("--output", &dangling).unwrap_err().to_string();
        assert!(e.starts_with("--output ") && e.contains("does not exist"), "{e}");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::os::unix::fs::symlink(&b, &a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let e = check_output("--output", &a).unwrap_err().to_string();
        assert!(e.contains("symlink loop"), "{e}");
        let e = check_output("--output", dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = check_output("--output", &dir.path().join("no/such/file")).unwrap_err().to_string();
        assert!(e.contains("directory") && e.contains("does not exist"), "{e}");
        check_output("--output", &dir.path().join("new.json")).unwrap();
    }
}
