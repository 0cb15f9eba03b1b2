//! Runs a CNI network configuration list the way the spec says a runtime does (and libcni does):
//! each plugin is executed with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS`, `CNI_PATH` in its environment and its configuration on stdin — the list's `name`
//! and `cniVersion` injected, the previous plugin's result as `prevResult`. ADD runs the plugins in
//! order, DEL in reverse with the cached ADD result, CHECK in order with it. The exit status and
//! stdout are what the plugin printed, untouched.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// The outcome of one plugin execution.
#[derive(Debug, Clone)]
pub struct Exec {
    pub plugin: String,
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed_ms: f64,
}

impl Exec {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }

    /// The CNI error code, when the plugin failed with the spec's error JSON.
    pub fn code(&self) -> Option<u64> {
        self.json().get("code").and_then(Value::as_u64)
    }
}

/// A runtime's view of one attachment.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Directories searched for plugin binaries (`CNI_PATH`).
    pub path: Vec<PathBuf>,
    pub container_id: String,
    /// Empty for DEL without a namespace.
    pub netns: String,
    pub ifname: String,
    pub args: Vec<(String, String)>,
    /// Run plugins inside this named network namespace (the simulated node), as a runtime on that
    /// node would.
    pub node_netns: Option<String>,
}

impl Runtime {
    fn find(&self, plugin: &str) -> Option<PathBuf> {
        self.path
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
    }

    fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// Executes one plugin binary with `command` and `config` on stdin.
    pub fn exec(&self, command: &str, config: &Value) -> Exec {
        let plugin = config
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let Some(bin) = self.find(&plugin) else {
            return Exec {
                plugin,
                status: -1,
                stdout: String::new(),
                stderr: "plugin not found on CNI_PATH".into(),
                elapsed_ms: 0.0,
            };
        };
        self.exec_binary(&bin, &plugin, command, &config.to_string())
    }

    /// Executes a plugin binary with raw stdin (for malformed-input tests).
    pub fn exec_binary(&self, bin: &Path, plugin: &str, command: &str, stdin: &str) -> Exec {
        let path = self
            .path
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let mut cmd = match &self.node_netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in [
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
        ] {
            if !v.is_empty() {
                cmd.env(k, v);
            }
        }
        if !self.args.is_empty() {
            cmd.env("CNI_ARGS", self.cni_args());
        }
        let started = std::time::Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait for plugin");
        Exec {
            plugin: plugin.to_string(),
            status: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        }
    }
}

/// A parsed conflist.
#[derive(Debug, Clone)]
pub struct ConfList {
    pub name: String,
    pub version: String,
    pub plugins: Vec<Value>,
}

impl ConfList {
    pub fn parse(text: &str) -> ConfList {
        let v: Value = serde_json::from_str(text).expect("conflist is JSON");
        ConfList {
            name: v["name"].as_str().unwrap_or_default().to_string(),
            version: v["cniVersion"].as_str().unwrap_or_default().to_string(),
            plugins: v["plugins"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// The same list at another spec version.
    pub fn with_version(&self, version: &str) -> ConfList {
        ConfList {
            version: version.to_string(),
            ..self.clone()
        }
    }

    fn config(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = json!(self.name);
        c["cniVersion"] = json!(self.version);
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    /// ADD through the list; stops at the first failure. Returns every execution and the final
    /// result on success.
    pub fn add(&self, rt: &Runtime) -> (Vec<Exec>, Option<Value>) {
        let mut prev: Option<Value> = None;
        let mut execs = Vec::new();
        for p in &self.plugins {
            let e = rt.exec("ADD", &self.config(p, prev.as_ref()));
            let ok = e.status == 0;
            prev = Some(e.json());
            execs.push(e);
            if !ok {
                return (execs, None);
            }
        }
        (execs, prev)
    }

    /// DEL in reverse order, each plugin given the cached result (as runtimes do).
    pub fn del(&self, rt: &Runtime, cached: Option<&Value>) -> Vec<Exec> {
        self.plugins
            .iter()
            .rev()
            .map(|p| rt.exec("DEL", &self.config(p, cached)))
            .collect()
    }

    /// CHECK in order with the cached result.
    pub fn check(&self, rt: &Runtime, cached: &Value) -> Vec<Exec> {
        self.plugins
            .iter()
            .map(|p| rt.exec("CHECK", &self.config(p, Some(cached))))
            .collect()
    }

    /// The keyway entry of the list, with list-level fields injected.
    pub fn keyway(&self, extra: Value) -> Value {
        let p = self
            .plugins
            .iter()
            .find(|p| p["type"] == "keyway")
            .expect("a keyway entry");
        let mut c = self.config(p, None);
        if let (Some(c), Some(x)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in x {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }
}
