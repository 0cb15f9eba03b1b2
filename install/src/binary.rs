//! The plugin binary in the node's CNI bin directories: copied under the name runtimes execute
//! (`keyway`, the conflist entry's type) by rename, so a runtime starting the plugin at that
//! moment runs either the old binary or the new one, never a partial file.

use std::path::Path;

use keyway_sap::io::fs;

use crate::confdir::{InstallError, io_err, remove_opt};
use crate::conflist::KEYWAY_TYPE;

/// Copies `plugin` into `bin_dir` as `keyway` unless the same bytes are already there; returns
/// whether it wrote.
pub fn install(plugin: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let bytes = std::fs::read(plugin).map_err(io_err("cannot read the plugin", plugin))?;
    let dest = bin_dir.join(KEYWAY_TYPE);
    if std::fs::read(&dest).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    fs::write_atomic(&dest, &bytes, 0o755)
        .map_err(io_err("cannot install the plugin as", &dest))?;
    Ok(true)
}

/// Removes the plugin from `bin_dir`; a missing binary is success.
pub fn uninstall(bin_dir: &Path) -> Result<(), InstallError> {
    remove_opt(&bin_dir.join(KEYWAY_TYPE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn copies_once_executable_and_removes_idempotently() {
        let t = std::env::temp_dir().join(format!("keyway-install-bin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        std::fs::create_dir_all(&t).unwrap();
        let src = t.join("keyway-cni");
        std::fs::write(&src, b"#!/bin/sh\necho v1\n").unwrap();
        let bin = t.join("bin");
        assert!(install(&src, &bin).unwrap());
        assert!(!install(&src, &bin).unwrap(), "same bytes: nothing written");
        let mode = std::fs::metadata(bin.join("keyway"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        std::fs::write(&src, b"#!/bin/sh\necho v2\n").unwrap();
        assert!(install(&src, &bin).unwrap(), "new bytes replace the old");
        assert_eq!(
            std::fs::read(bin.join("keyway")).unwrap(),
            b"#!/bin/sh\necho v2\n"
        );
        let names: Vec<_> = std::fs::read_dir(&bin)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["keyway"], "no temporary file left");
        uninstall(&bin).unwrap();
        uninstall(&bin).unwrap();
        assert!(!bin.join("keyway").exists());
        let e = install(&t.join("missing"), &bin).unwrap_err().to_string();
        assert!(e.contains("cannot read the plugin"), "{e}");
        std::fs::remove_dir_all(&t).unwrap();
    }
}
