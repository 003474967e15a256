//! A local Kubernetes control plane: etcd and kube-apiserver built from their published Go modules
//! (the versions `xtask/controlplane/*/go.mod` pin: the one source of both), started on loopback
//! as controller-runtime's envtest does. `cargo xtask cluster up` keeps one running in the
//! background; the agent tests start a private one each ([`ControlPlane::start`]) and stop it on
//! drop, so parallel tests never share one.
//!
//! What it runs: etcd on two free loopback ports; kube-apiserver on a third, TLS with a private
//! CA (certificates generated into the directory with `openssl`), service-account signing keys
//! (the TokenRequest API works), `--authorization-mode=Node,RBAC`, and an audit policy logging
//! every request at Metadata level into `DIR/audit.log`. There is no controller-manager,
//! scheduler or kubelet: whoever uses it writes what those would (ServiceAccounts, EndpointSlices,
//! pod status).

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The Service range: the test cluster's ClusterIPs (10.96.0.1 for `kubernetes`) lie in it.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The first address of [`SERVICE_CIDR`]: the apiserver gives it to the `kubernetes` Service.
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// The admin kubeconfig inside a control plane's directory.
pub const KUBECONFIG: &str = "admin.kubeconfig";
/// The audit log inside a control plane's directory (JSON lines, one event per request).
pub const AUDIT_LOG: &str = "audit.log";

/// The Go module of one component: where its go.mod lives, the module whose version it pins,
/// and the main packages to build from it.
struct Component {
    name: &'static str,
    pinned: &'static str,
    packages: &'static [&'static str],
    /// `-X` settings for the version strings the binaries report (`{v}` is the pinned version).
    version_vars: &'static [&'static str],
    /// How long a first build took here (2 cores, empty Go caches), for the progress line.
    first_build: &'static str,
}

const KUBERNETES: Component = Component {
    name: "kubernetes",
    pinned: "k8s.io/kubernetes",
    packages: &["k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes/cmd/kubectl"],
    // Built outside Kubernetes' own scripts, the binaries would report v0.0.0 and kubectl would
    // warn about version skew.
    version_vars: &["k8s.io/component-base/version.gitVersion={v}", "k8s.io/client-go/pkg/version.gitVersion={v}"],
    first_build: "the first build takes ~6 min on 2 cores",
};

const ETCD: Component = Component {
    name: "etcd",
    pinned: "go.etcd.io/etcd/server/v3",
    packages: &["."],
    version_vars: &[],
    first_build: "the first build takes ~30 s",
};

/// Where the built binaries are.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub kubernetes_version: String,
    pub etcd_version: String,
    pub kube_apiserver: PathBuf,
    pub kubectl: PathBuf,
    pub etcd: PathBuf,
}

/// The workspace root (xtask lives in it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

fn module_dir(root: &Path, c: &Component) -> PathBuf {
    root.join("xtask/controlplane").join(c.name)
}

/// The version `go.mod` pins for the component's module.
fn pinned_version(root: &Path, c: &Component) -> Result<String> {
    let path = module_dir(root, c).join("go.mod");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| l.trim().trim_start_matches("require").trim())
        .find_map(|l| l.strip_prefix(c.pinned)?.split_whitespace().next().map(str::to_string))
        .with_context(|| format!("{}: no `require {} vX.Y.Z` line", path.display(), c.pinned))
}

fn bin_dir(root: &Path, c: &Component, version: &str) -> PathBuf {
    target_dir(root).join("k8s").join(format!("{}-{version}", c.name)).join("bin")
}

fn binary_names(c: &Component) -> Vec<&'static str> {
    c.packages.iter().map(|p| if *p == "." { c.name } else { p.rsplit('/').next().unwrap_or(p) }).collect()
}

/// The binaries for the pinned versions, if they were built (nothing is built here).
pub fn binaries(root: &Path) -> Result<Binaries> {
    let kubernetes_version = pinned_version(root, &KUBERNETES)?;
    let etcd_version = pinned_version(root, &ETCD)?;
    let k8s = bin_dir(root, &KUBERNETES, &kubernetes_version);
    let etcd = bin_dir(root, &ETCD, &etcd_version).join("etcd");
    Ok(Binaries {
        kube_apiserver: k8s.join("kube-apiserver"),
        kubectl: k8s.join("kubectl"),
        etcd,
        kubernetes_version,
        etcd_version,
    })
}

impl Binaries {
    fn missing(&self) -> Vec<&Path> {
        [&self.kube_apiserver, &self.kubectl, &self.etcd]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| p.as_path())
            .collect()
    }

    /// The binaries, or an error saying how to build them (for tests, which never build).
    pub fn require(root: &Path) -> Result<Binaries> {
        let b = binaries(root)?;
        let missing = b.missing();
        if !missing.is_empty() {
            bail!(
                "the local control plane is not built ({} missing): run the tests through `cargo xtask test`, \
                 or build it with `cargo xtask cluster build`",
                missing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        Ok(b)
    }
}

/// Builds whatever of the pinned binaries is missing (once per version; then from cache).
pub fn build(root: &Path, say: &dyn Fn(&str)) -> Result<Binaries> {
    let go = go_command()?;
    for c in [&KUBERNETES, &ETCD] {
        let version = pinned_version(root, c)?;
        let dir = bin_dir(root, c, &version);
        let names = binary_names(c);
        if names.iter().all(|n| dir.join(n).is_file()) {
            say(&format!("{} {version}: cached in {}", names.join(", "), dir.display()));
            continue;
        }
        say(&format!(
            "building {} {version} from its Go module into {} (once per version, then cached; {})",
            names.join(", "),
            dir.display(),
            c.first_build
        ));
        let started = Instant::now();
        go_build(&go, &module_dir(root, c), c, &version, &dir)?;
        say(&format!("built {} in {:.0?}", names.join(", "), started.elapsed()));
    }
    Binaries::require(root)
}

fn go_command() -> Result<PathBuf> {
    // Debian's and the official tarball's places, for shells whose PATH lacks them.
    let candidates = [PathBuf::from("go"), PathBuf::from("/usr/local/go/bin/go"), PathBuf::from("/usr/lib/go/bin/go")];
    candidates
        .into_iter()
        .find(|go| Command::new(go).arg("version").output().is_ok_and(|o| o.status.success()))
        .context(
            "`go` was not found (PATH, /usr/local/go/bin): the local control plane builds kube-apiserver, \
             kubectl and etcd from their Go modules; install Go 1.26 or newer and retry",
        )
}

fn go_build(go: &Path, module: &Path, c: &Component, version: &str, out: &Path) -> Result<()> {
    // Built into a fresh directory and renamed: an interrupted build leaves no half binary.
    let parent = out.parent().context("bin dir has a parent")?;
    fs::create_dir_all(parent)?;
    let tmp = parent.join("bin.partial");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let mut ldflags = String::from("-s -w");
    for var in c.version_vars {
        ldflags.push_str(&format!(" -X {}", var.replace("{v}", version)));
    }
    let status = Command::new(go)
        .current_dir(module)
        .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
        .arg(&tmp)
        .args(c.packages)
        // The go.mod's toolchain, never one fetched on the side; go.sum is committed.
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=readonly")
        .stdin(Stdio::null())
        .status()
        .context("running `go build`")?;
    if !status.success() {
        bail!("`go build` of {} in {} failed ({status})", c.packages.join(" "), module.display());
    }
    let _ = fs::remove_dir_all(out);
    fs::rename(&tmp, out).with_context(|| format!("moving the binaries to {}", out.display()))?;
    Ok(())
}

/// A running control plane. Dropping it stops both processes and removes its directory unless
/// it was [`ControlPlane::detach`]ed.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub bins: Binaries,
    /// The apiserver's address (https://127.0.0.1:PORT).
    pub server: String,
    pub apiserver_port: u16,
    pub etcd_port: u16,
    etcd_peer_port: u16,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    remove_on_drop: bool,
}

/// A free loopback port (released again: the process it is meant for binds it next).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ControlPlane {
    /// Generates certificates into `dir` (made fresh), starts etcd and kube-apiserver, waits for
    /// `/readyz` and writes the admin kubeconfig.
    pub fn start(bins: &Binaries, dir: &Path) -> Result<ControlPlane> {
        if dir.exists() && fs::read_dir(dir)?.next().is_some() {
            bail!("{} is not empty: stop what runs there first (`cargo xtask cluster down`)", dir.display());
        }
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        certificates(&dir)?;
        fs::write(dir.join("audit-policy.yaml"), AUDIT_POLICY)?;
        let mut cp = ControlPlane {
            server: String::new(),
            apiserver_port: free_port()?,
            etcd_port: free_port()?,
            etcd_peer_port: free_port()?,
            bins: bins.clone(),
            etcd: None,
            apiserver: None,
            remove_on_drop: true,
            dir,
        };
        cp.server = format!("https://127.0.0.1:{}", cp.apiserver_port);
        fs::write(cp.kubeconfig(), kubeconfig(&cp.server, &cp.dir))?;
        cp.start_etcd()?;
        cp.start_apiserver()?;
        Ok(cp)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join(KUBECONFIG)
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.join(AUDIT_LOG)
    }

    fn spawn(&self, name: &str, bin: &Path, args: &[String]) -> Result<Child> {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log")))?;
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(bin)
                .args(args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                // Its own process group: a Ctrl-C meant for `cluster up` does not reach it.
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?
        };
        fs::write(self.dir.join(format!("{name}.pid")), child.id().to_string())?;
        Ok(child)
    }

    fn start_etcd(&mut self) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.etcd_port);
        let peer = format!("http://127.0.0.1:{}", self.etcd_peer_port);
        let args = [
            "--name=default".to_string(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=default={peer}"),
            // A throwaway store: durability costs seconds per test and buys nothing here.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        self.etcd = Some(self.spawn("etcd", &self.bins.etcd.clone(), &args)?);
        self.wait("etcd", Duration::from_secs(30), |cp| cp.etcd_post("/v3/maintenance/status", "{}").is_ok())
    }

    fn apiserver_args(&self) -> Vec<String> {
        let d = |f: &str| self.dir.join(f).display().to_string();
        vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.apiserver_port),
            // The endpoint reconciler refuses a loopback address, and nothing else may be
            // advertised here: the `kubernetes` EndpointSlice is the test cluster's to write.
            "--endpoint-reconciler-type=none".into(),
            format!("--tls-cert-file={}", d("apiserver.crt")),
            format!("--tls-private-key-file={}", d("apiserver.key")),
            format!("--client-ca-file={}", d("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=Node,RBAC".into(),
            format!("--audit-policy-file={}", d("audit-policy.yaml")),
            format!("--audit-log-path={}", d(AUDIT_LOG)),
            "--allow-privileged=true".into(),
        ]
    }

    /// Starts kube-apiserver (again, after [`ControlPlane::stop_apiserver`]) and waits for `/readyz`.
    pub fn start_apiserver(&mut self) -> Result<()> {
        if self.apiserver.is_some() {
            bail!("kube-apiserver is already running");
        }
        let args = self.apiserver_args();
        self.apiserver = Some(self.spawn("kube-apiserver", &self.bins.kube_apiserver.clone(), &args)?);
        self.wait("kube-apiserver /readyz", Duration::from_secs(90), |cp| {
            cp.kubectl(&["get", "--raw", "/readyz"]).is_ok_and(|o| o.status.success())
        })
    }

    /// Stops kube-apiserver (SIGTERM, as a rolling control-plane upgrade does); etcd keeps running.
    pub fn stop_apiserver(&mut self) {
        stop(self.apiserver.take());
    }

    /// Restarts kube-apiserver on the same port and storage.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        self.stop_apiserver();
        self.start_apiserver()
    }

    /// Waits for `ready`, failing early (with the log's tail) if a process died.
    fn wait(&mut self, what: &str, timeout: Duration, ready: impl Fn(&ControlPlane) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if ready(self) {
                return Ok(());
            }
            let exited = |c: &mut Option<Child>| c.as_mut().and_then(|c| c.try_wait().ok().flatten());
            for (name, status) in [("etcd", exited(&mut self.etcd)), ("kube-apiserver", exited(&mut self.apiserver))] {
                if let Some(status) = status {
                    bail!("{name} exited ({status}) while waiting for {what}:\n{}", self.log_tail(name));
                }
            }
            if Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}:\n{}", self.log_tail("kube-apiserver"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Runs kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(&self.bins.kubectl)
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")
    }

    /// POSTs JSON to etcd's gRPC gateway (plain HTTP on loopback) and returns the body.
    pub fn etcd_post(&self, path: &str, body: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.etcd_port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").context("etcd: no HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("etcd {path}: {}", head.lines().next().unwrap_or_default());
        }
        Ok(body.to_string())
    }

    /// Compacts etcd's history up to its current revision: every watch resumed from an older
    /// resourceVersion is then answered 410 Gone.
    pub fn compact_etcd(&self) -> Result<u64> {
        let status = self.etcd_post("/v3/kv/range", r#"{"key": "AA==", "limit": 1}"#)?;
        let revision: u64 = status
            .split("\"revision\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|r| r.parse().ok())
            .with_context(|| format!("etcd's range answer has no revision: {status}"))?;
        self.etcd_post("/v3/kv/compaction", &format!(r#"{{"revision": "{revision}", "physical": true}}"#))?;
        Ok(revision)
    }

    /// Leaves both processes running (for `cluster up`); `down` stops them by their pid files.
    pub fn detach(mut self) {
        self.remove_on_drop = false;
        self.etcd.take();
        self.apiserver.take();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if !self.remove_on_drop {
            return;
        }
        stop(self.apiserver.take());
        stop(self.etcd.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn stop(child: Option<Child>) {
    if let Some(mut c) = child {
        terminate(c.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn terminate(pid: u32) {
    // SAFETY: kill(2) takes any pid and signal; a stale pid is reported as ESRCH, nothing more.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}

/// Stops a detached control plane by its pid files and removes its directory.
pub fn down(dir: &Path, say: &dyn Fn(&str)) -> Result<()> {
    if !dir.exists() {
        say(&format!("nothing runs in {}", dir.display()));
        return Ok(());
    }
    for name in ["kube-apiserver", "etcd"] {
        let Ok(pid) = fs::read_to_string(dir.join(format!("{name}.pid"))) else { continue };
        let Ok(pid) = pid.trim().parse::<u32>() else { continue };
        say(&format!("stopping {name} (pid {pid})"));
        terminate(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: signal 0 only asks whether the process exists.
        while unsafe { libc::kill(pid as libc::pid_t, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        // SAFETY: as above; SIGKILL for one that ignored SIGTERM.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    say(&format!("removed {}", dir.display()));
    Ok(())
}

const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
";

fn kubeconfig(server: &str, dir: &Path) -> String {
    let d = |f: &str| dir.join(f).display().to_string();
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}
users:
- name: admin
  user: {{client-certificate: \"{}\", client-key: \"{}\"}}
contexts:
- name: local
  context: {{cluster: local, user: admin}}
current-context: local
",
        d("ca.crt"),
        d("admin.crt"),
        d("admin.key")
    )
}

/// A private CA, the apiserver's serving certificate (loopback and the `kubernetes` Service's
/// names), an admin client certificate (system:masters) and the service-account signing key.
fn certificates(dir: &Path) -> Result<()> {
    let openssl = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running openssl (fix: apt-get install openssl)")?;
        if !out.status.success() {
            bail!("openssl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"],
            &key[..],
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "3650", "-subj", "/CN=netaudit-local-ca"],
        ]
        .concat(),
    )?;
    let sans = format!(
        "subjectAltName=IP:127.0.0.1,IP:{KUBERNETES_SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
         DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n"
    );
    fs::write(dir.join("server.ext"), sans)?;
    fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    for (name, subject, ext) in
        [("apiserver", "/CN=kube-apiserver", "server.ext"), ("admin", "/O=system:masters/CN=admin", "client.ext")]
    {
        let (k, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        openssl(&[&["req"], &key[..], &["-keyout", &k, "-out", &csr, "-subj", subject]].concat())?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "3650",
            "-extfile",
            ext,
        ])?;
    }
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key"])?;
    openssl(&["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(())
}
