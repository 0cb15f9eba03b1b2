//! The node's CNI configuration directory, as the runtime sees it: which file is the primary
//! network (the first valid one in name order, as libcni lists them for kubelet and containerd),
//! keyway's entry put into it and kept there, and taken out again leaving the primary's file as
//! the primary wrote it.
//!
//! What keyway changed is remembered in its own state directory, outside the CNI directory:
//! `orig/<file>` holds the primary's bytes from before keyway's first edit, and
//! `converted/<file>.conflist` names the `.conf` a conflist was made from. Uninstall restores
//! those bytes exactly when the file still says what keyway made of them, and otherwise only
//! takes keyway's entry out (someone else changed the file since, and their change stays).

use std::io;
use std::path::{Path, PathBuf};

use keyway_sap::io::fs;
use serde_json::Value;

use crate::conflist::{self, ConfError, ConfigFile, Kind};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// What one reconciliation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// No valid primary configuration yet: nothing to join.
    NoPrimary,
    /// keyway's entry was already in place in this file.
    Unchanged(String),
    /// This file was (re)written with keyway's entry; `replaced` is the `.conf` it was made from.
    Wrote {
        file: String,
        replaced: Option<String>,
    },
}

/// One file of the directory as read.
#[derive(Debug)]
pub struct Scanned {
    pub name: String,
    pub bytes: Vec<u8>,
    pub parsed: Result<ConfigFile, ConfError>,
}

/// The CNI configuration directory and keyway's memory of what it did there.
#[derive(Debug, Clone)]
pub struct ConfDir {
    pub dir: PathBuf,
    pub state: PathBuf,
}

/// Writes `bytes` to `path` whole or not at all, so a runtime never reads half a file; an existing
/// file's permissions are kept (a new one is 0644, as CNI configuration is).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    let mode = fs::mode_of(path, 0o644);
    fs::write_atomic(path, bytes, mode).map_err(io_err("cannot write", path))
}

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, InstallError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", path)(e)),
    }
}

pub(crate) fn remove_opt(path: &Path) -> Result<(), InstallError> {
    fs::remove_if_present(path).map_err(io_err("cannot remove", path))
}

impl ConfDir {
    pub fn new(dir: impl Into<PathBuf>, state: impl Into<PathBuf>) -> ConfDir {
        ConfDir {
            dir: dir.into(),
            state: state.into(),
        }
    }

    fn orig(&self, name: &str) -> PathBuf {
        self.state.join("orig").join(name)
    }

    fn converted(&self, name: &str) -> PathBuf {
        self.state.join("converted").join(name)
    }

    fn save(&self, path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(io_err("cannot create", d))?;
        }
        write_atomic(path, bytes)
    }

    /// Every configuration file, in the order runtimes read them.
    pub fn scan(&self) -> Result<Vec<Scanned>, InstallError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("cannot list", &self.dir)(e)),
        };
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| conflist::kind_of(n).is_some())
            .collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            // A file that vanished between listing and reading is simply not there.
            let Some(bytes) = read_opt(&self.dir.join(&name))? else {
                continue;
            };
            let parsed = conflist::parse(&name, &bytes);
            out.push(Scanned {
                name,
                bytes,
                parsed,
            });
        }
        Ok(out)
    }

    /// The primary network: the first valid file with a plugin other than keyway's. Invalid files
    /// are skipped, as runtimes skip them, with a warning.
    pub fn primary(&self) -> Result<Option<(String, ConfigFile, Vec<u8>)>, InstallError> {
        for s in self.scan()? {
            match s.parsed {
                Ok(cf) if cf.has_primary() => return Ok(Some((s.name, cf, s.bytes))),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "skipping an invalid CNI configuration"),
            }
        }
        Ok(None)
    }

    /// Puts keyway's `entry` into the primary configuration, or confirms it is there.
    pub fn reconcile(&self, entry: &Value) -> Result<Reconciled, InstallError> {
        let Some((name, cf, bytes)) = self.primary()? else {
            return Ok(Reconciled::NoPrimary);
        };
        match cf.kind {
            Kind::ConfList => {
                if conflist::is_in_place(&cf.value, entry) {
                    return Ok(Reconciled::Unchanged(name));
                }
                if !conflist::has_keyway(&cf.value) {
                    // The primary's own bytes: what uninstall gives back.
                    self.save(&self.orig(&name), &bytes)?;
                }
                let list = conflist::with_keyway(&cf.value, entry);
                write_atomic(&self.dir.join(&name), &conflist::render(&list))?;
                Ok(Reconciled::Wrote {
                    file: name,
                    replaced: None,
                })
            }
            Kind::Conf => {
                let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
                let target = format!("{stem}.conflist");
                self.save(&self.orig(&name), &bytes)?;
                self.save(&self.converted(&target), name.as_bytes())?;
                let list = conflist::with_keyway(&cf.into_list(), entry);
                write_atomic(&self.dir.join(&target), &conflist::render(&list))?;
                // The `.conf` sorts before its `.conflist`: it must go, or it stays the primary.
                remove_opt(&self.dir.join(&name))?;
                Ok(Reconciled::Wrote {
                    file: target,
                    replaced: Some(name),
                })
            }
        }
    }

    /// Takes keyway out of every configuration file; returns the files it changed.
    pub fn uninstall(&self) -> Result<Vec<String>, InstallError> {
        let mut changed = Vec::new();
        for s in self.scan()? {
            let Ok(cf) = s.parsed else { continue };
            if cf.kind != Kind::ConfList || !conflist::has_keyway(&cf.value) {
                continue;
            }
            let without = conflist::without_keyway(&cf.value);
            let path = self.dir.join(&s.name);
            if let Some(from) = read_opt(&self.converted(&s.name))? {
                let from = String::from_utf8_lossy(&from).into_owned();
                if let Some(orig) = read_opt(&self.orig(&from))?
                    && conflist::parse(&from, &orig).is_ok_and(|o| o.into_list() == without)
                {
                    write_atomic(&self.dir.join(&from), &orig)?;
                    remove_opt(&path)?;
                    changed.push(from);
                    continue;
                }
            } else if let Some(orig) = read_opt(&self.orig(&s.name))?
                && conflist::parse(&s.name, &orig).is_ok_and(|o| o.value == without)
            {
                write_atomic(&path, &orig)?;
                changed.push(s.name);
                continue;
            }
            write_atomic(&path, &conflist::render(&without))?;
            changed.push(s.name);
        }
        for d in ["orig", "converted"] {
            let p = self.state.join(d);
            match std::fs::remove_dir_all(&p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("cannot remove", &p)(e));
                }
                _ => {}
            }
        }
        Ok(changed)
    }
}
