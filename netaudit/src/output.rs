//! Writing files the user asked for (flow files, proposals, artefacts, state): atomically, so a
//! reader never sees half a file and a failed write keeps the old one — and never by replacing a
//! device, FIFO or symlink.

use std::{io::Write, path::Path};

use anyhow::{Context, Result};

use crate::input::BadInput;

pub fn check_output_dir(out: &Path) -> Result<()> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(BadInput(format!("--output {}: directory {} does not exist", out.display(), dir.display())).into());
    }
    Ok(())
}

/// Writes through a temporary file in the same directory and renames it into place, so a
/// reader never sees half a file and an existing file survives a failed write.
pub fn write_atomically(path: &Path, contents: &str) -> Result<()> {
    // Renaming a temporary file over a device, FIFO or socket (`--output /dev/null`, a pipe)
    // would replace the node itself: those are written in place. A symlink is followed, so the
    // file it points to is replaced, not the link.
    let resolved;
    let path = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            resolved = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
            resolved.as_path()
        }
        _ => path,
    };
    if let Ok(meta) = std::fs::metadata(path)
        && !meta.is_file()
    {
        if meta.is_dir() {
            return Err(BadInput(format!("{} is a directory; give a file name", path.display())).into());
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        return Ok(());
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(contents.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).with_context(|| format!("writing {}", path.display()))?;
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
}
