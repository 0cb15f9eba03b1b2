//! A synchronous client of containerd's CRI (runtime.v1), as kubelet uses it: sandboxes, containers,
//! exec. Each call carries a deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// A connected CRI client with its own small runtime.
#[derive(Debug)]
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

/// A pod the lab asks for.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub log_dir: PathBuf,
    /// The pod's resolver, as kubelet sets it for `dnsPolicy: ClusterFirst` (the runtime writes
    /// `/etc/resolv.conf` from it); `None`: the runtime's default.
    pub dns: Option<DnsSpec>,
}

/// `/etc/resolv.conf` for a pod: nameservers, search domains, options.
#[derive(Debug, Clone, Default)]
pub struct DnsSpec {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl DnsSpec {
    /// What kubelet writes for a pod in `namespace` of a cluster whose DNS Service is `server`.
    pub fn cluster_first(server: &str, namespace: &str) -> DnsSpec {
        DnsSpec {
            servers: vec![server.to_string()],
            searches: vec![
                format!("{namespace}.svc.cluster.local"),
                "svc.cluster.local".into(),
                "cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        }
    }
}

/// A container of a pod: its name, command and host directories (host path, container path).
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub mounts: Vec<(PathBuf, String)>,
}

impl Cri {
    pub fn connect(socket: &Path) -> anyhow::Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = socket.to_path_buf();
        let channel = rt.block_on(async move {
            Endpoint::try_from("http://[::]:50051")?
                .timeout(Duration::from_secs(60))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        })?;
        Ok(Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        })
    }

    pub fn version(&mut self) -> anyhow::Result<String> {
        let r = self.rt.block_on(self.client.version(cri::VersionRequest {
            version: "v1".into(),
        }))?;
        let v = r.into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    fn sandbox_config(p: &PodSpec) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: p.name.clone(),
                uid: p.uid.clone(),
                namespace: p.namespace.clone(),
                attempt: 0,
            }),
            hostname: p.name.clone(),
            log_directory: p.log_dir.display().to_string(),
            dns_config: p.dns.as_ref().map(|d| cri::DnsConfig {
                servers: d.servers.clone(),
                searches: d.searches.clone(),
                options: d.options.clone(),
            }),
            labels: p.labels.clone().into_iter().collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox: the runtime creates the sandbox and runs the CNI chain.
    pub fn run_pod_sandbox(&mut self, p: &PodSpec) -> anyhow::Result<String> {
        std::fs::create_dir_all(&p.log_dir)?;
        let req = cri::RunPodSandboxRequest {
            config: Some(Self::sandbox_config(p)),
            runtime_handler: String::new(),
        };
        let r = self
            .rt
            .block_on(self.client.run_pod_sandbox(req))
            .with_context(|| format!("RunPodSandbox {}/{}", p.namespace, p.name))?;
        Ok(r.into_inner().pod_sandbox_id)
    }

    /// The sandbox's network namespace path, from the runtime's verbose status (its OCI spec).
    pub fn netns_path(&mut self, id: &str) -> anyhow::Result<String> {
        let r = self.rt.block_on(
            self.client
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.into(),
                    verbose: true,
                }),
        )?;
        let info = r.into_inner().info.remove("info").unwrap_or_default();
        let info: serde_json::Value = serde_json::from_str(&info)?;
        info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .map(str::to_string)
            .with_context(|| format!("sandbox {id} reports no network namespace"))
    }

    /// The sandbox's IPs (the primary interface's, as kubelet reports them).
    pub fn pod_ips(&mut self, id: &str) -> anyhow::Result<Vec<String>> {
        let r = self.rt.block_on(
            self.client
                .pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: id.into(),
                    verbose: false,
                }),
        )?;
        let net = r
            .into_inner()
            .status
            .and_then(|s| s.network)
            .unwrap_or_default();
        let mut ips = vec![net.ip];
        ips.extend(net.additional_ips.into_iter().map(|i| i.ip));
        Ok(ips.into_iter().filter(|i| !i.is_empty()).collect())
    }

    pub fn create_and_start(
        &mut self,
        sandbox: &str,
        pod: &PodSpec,
        c: &ContainerSpec,
    ) -> anyhow::Result<String> {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: c.name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: c.image.clone(),
                ..Default::default()
            }),
            command: c.command.clone(),
            mounts: c
                .mounts
                .iter()
                .map(|(host, container)| cri::Mount {
                    host_path: host.display().to_string(),
                    container_path: container.clone(),
                    ..Default::default()
                })
                .collect(),
            log_path: format!("{}.log", c.name),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    capabilities: Some(cri::Capability {
                        add_capabilities: vec!["NET_RAW".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.into(),
            config: Some(config),
            sandbox_config: Some(Self::sandbox_config(pod)),
        };
        let id = self
            .rt
            .block_on(self.client.create_container(req))
            .with_context(|| format!("CreateContainer {}", c.name))?
            .into_inner()
            .container_id;
        self.rt
            .block_on(self.client.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }))
            .with_context(|| format!("StartContainer {}", c.name))?;
        Ok(id)
    }

    /// ExecSync: runs a command in a container and returns (exit code, stdout, stderr).
    pub fn exec_sync(
        &mut self,
        container: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> anyhow::Result<(i32, String, String)> {
        let req = cri::ExecSyncRequest {
            container_id: container.into(),
            cmd: cmd.to_vec(),
            timeout: timeout.as_secs().max(1) as i64,
        };
        let r = self
            .rt
            .block_on(self.client.exec_sync(req))
            .with_context(|| format!("ExecSync in {container}"))?
            .into_inner();
        Ok((
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        ))
    }

    pub fn stop_pod_sandbox(&mut self, id: &str) -> anyhow::Result<()> {
        self.rt
            .block_on(self.client.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))
            .context("StopPodSandbox")?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&mut self, id: &str) -> anyhow::Result<()> {
        self.rt
            .block_on(
                self.client
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                        pod_sandbox_id: id.into(),
                    }),
            )
            .context("RemovePodSandbox")?;
        Ok(())
    }

    /// Every sandbox the runtime holds (id, namespace, name).
    pub fn list_sandboxes(&mut self) -> anyhow::Result<Vec<(String, String, String)>> {
        let r = self
            .rt
            .block_on(
                self.client
                    .list_pod_sandbox(cri::ListPodSandboxRequest::default()),
            )?
            .into_inner();
        Ok(r.items
            .into_iter()
            .map(|s| {
                let m = s.metadata.unwrap_or_default();
                (s.id, m.namespace, m.name)
            })
            .collect())
    }
}
