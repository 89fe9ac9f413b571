//! Users' TorchScript backbones run in a sandboxed `vidtune script-host` child, never in the
//! process that called them. TorchScript is code: loaded in the API server or a training
//! process it could read the data directory, the keys and every tenant's files.
//!
//! The child is started contained (`sandbox::contain`: cleared environment, rlimits, death
//! with its parent, no inherited descriptors, the `nobody` uid when the server runs as root),
//! initialises libtorch, locks itself down (`sandbox::lock_down`: Landlock with no filesystem
//! and no TCP, seccomp refusing new processes and sockets) and only then receives the module's
//! bytes over its stdin. From there on it only computes:
//!
//! - the parent owns the parameters (in its `VarStore`, so checkpoints, optimizers, freezing
//!   and exports work as for built-in backbones) and sends them when they changed;
//! - `forward` returns the features `[N, D]`; in training the child keeps the graph;
//! - `backward` takes the features' gradient and returns the parameters' gradients, which the
//!   parent adds to its own (see [`Remote::finish_backward`]).
//!
//! Every message the parent reads is bounded and checked against what it expects (shapes of
//! its own parameters, `[N, D]` features) before anything is allocated, and every exchange
//! has a deadline after which the child is killed.
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::sandbox::{self, Confinement, Limits};

/// How this process starts script hosts; set once at startup ([`configure`]).
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The vidtune binary (started as `script-host`).
    pub exe: PathBuf,
    /// Address-space limit of a CPU host.
    pub memory_bytes: u64,
    /// Longest a single forward or backward may take before the host is killed.
    pub call_timeout: Duration,
    /// Start hosts even where the kernel lacks Landlock or seccomp (the operator's choice).
    pub allow_unconfined: bool,
}

impl Default for HostConfig {
    /// This binary, and the environment's `VIDTUNE_SANDBOX_MEMORY_MIB` (default 16384),
    /// `VIDTUNE_SANDBOX_CALL_SECS` (default 300) and `VIDTUNE_ALLOW_UNCONFINED_BACKBONES`.
    fn default() -> Self {
        let num = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(d)
        };
        Self {
            exe: std::env::current_exe().unwrap_or_else(|_| "vidtune".into()),
            memory_bytes: num("VIDTUNE_SANDBOX_MEMORY_MIB", 16384) << 20,
            call_timeout: Duration::from_secs(num("VIDTUNE_SANDBOX_CALL_SECS", 300)),
            allow_unconfined: std::env::var("VIDTUNE_ALLOW_UNCONFINED_BACKBONES").as_deref()
                == Ok("1"),
        }
    }
}

static CONFIG: OnceLock<HostConfig> = OnceLock::new();

/// Set how script hosts are started (first call wins; later calls are ignored).
pub fn configure(cfg: HostConfig) {
    let _ = CONFIG.set(cfg);
}

fn config() -> &'static HostConfig {
    CONFIG.get_or_init(HostConfig::default)
}

/// Largest JSON header of a message (names of a few thousand parameters fit easily).
const MAX_HEADER: usize = 4 << 20;
/// Largest feature width a module may return.
const MAX_FEATURE_DIM: i64 = 1 << 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Meta {
    kind: String,
    shape: Vec<i64>,
}

fn kind_name(k: Kind) -> anyhow::Result<&'static str> {
    Ok(match k {
        Kind::Float => "f32",
        Kind::Double => "f64",
        Kind::Half => "f16",
        Kind::BFloat16 => "bf16",
        Kind::Uint8 => "u8",
        other => bail!("parameters of kind {other:?} are not supported"),
    })
}

fn parse_kind(s: &str) -> anyhow::Result<Kind> {
    Ok(match s {
        "f32" => Kind::Float,
        "f64" => Kind::Double,
        "f16" => Kind::Half,
        "bf16" => Kind::BFloat16,
        "u8" => Kind::Uint8,
        other => bail!("unknown tensor kind {other}"),
    })
}

impl Meta {
    fn of(t: &Tensor) -> anyhow::Result<Self> {
        Ok(Self {
            kind: kind_name(t.kind())?.into(),
            shape: t.size(),
        })
    }

    /// Bytes of the payload, with checked arithmetic (the peer may be hostile).
    fn bytes(&self) -> anyhow::Result<usize> {
        let elt = match self.kind.as_str() {
            "f64" => 8,
            "f32" => 4,
            "u8" => 1,
            _ => 2,
        };
        let mut n: usize = elt;
        for &d in &self.shape {
            let d = usize::try_from(d).map_err(|_| anyhow::anyhow!("negative dimension"))?;
            n = n
                .checked_mul(d)
                .ok_or_else(|| anyhow::anyhow!("tensor size overflows"))?;
        }
        Ok(n)
    }
}

/// The parent → child requests.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// The module's bytes follow as a u8 tensor; answers `Params`.
    Load { device: String },
    /// New values for every parameter, in the order of `Params`; answers `Done`.
    SetParams,
    /// One input tensor; answers `Features`.
    Forward { train: bool, keep_graph: bool },
    /// The features' gradient; answers `Grads`.
    Backward,
}

/// The child → parent answers.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Ready(Confinement),
    /// Names (with `requires_grad`) of the module's parameters; their values follow.
    Params(Vec<(String, bool)>),
    Done,
    Features,
    Grads,
    Error(String),
}

/// A frame: u32 header length, JSON header, then u32 tensor count, per tensor a u32 meta
/// length, JSON meta and the raw bytes.
fn write_frame<T: Serialize>(
    w: &mut impl Write,
    header: &T,
    tensors: &[&Tensor],
) -> anyhow::Result<()> {
    let h = serde_json::to_vec(header)?;
    w.write_all(&(h.len() as u32).to_le_bytes())?;
    w.write_all(&h)?;
    w.write_all(&(tensors.len() as u32).to_le_bytes())?;
    for t in tensors {
        let t = t.to_device(Device::Cpu).contiguous();
        let meta = serde_json::to_vec(&Meta::of(&t)?)?;
        w.write_all(&(meta.len() as u32).to_le_bytes())?;
        w.write_all(&meta)?;
        let n = Meta::of(&t)?.bytes()?;
        let mut buf = vec![0u8; n];
        t.copy_data_u8(&mut buf, t.numel());
        w.write_all(&buf)?;
    }
    w.flush()?;
    Ok(())
}

/// Read a frame; `check` sees each tensor's meta (and its index) before its bytes are read,
/// so a hostile peer cannot make the reader allocate what it did not expect.
fn read_frame<T: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
    mut check: impl FnMut(usize, &Meta) -> anyhow::Result<()>,
) -> anyhow::Result<(T, Vec<Tensor>)> {
    let mut u32buf = [0u8; 4];
    let mut read_u32 = |r: &mut dyn Read| -> anyhow::Result<usize> {
        r.read_exact(&mut u32buf)?;
        Ok(u32::from_le_bytes(u32buf) as usize)
    };
    let hlen = read_u32(r)?;
    if hlen > MAX_HEADER {
        bail!("message header of {hlen} bytes");
    }
    let mut h = vec![0u8; hlen];
    r.read_exact(&mut h)?;
    let header: T = serde_json::from_slice(&h).context("message header")?;
    let count = read_u32(r)?;
    if count > 100_000 {
        bail!("{count} tensors in one message");
    }
    let mut tensors = Vec::with_capacity(count.min(1024));
    for i in 0..count {
        let mlen = read_u32(r)?;
        if mlen > 64 << 10 {
            bail!("tensor header of {mlen} bytes");
        }
        let mut m = vec![0u8; mlen];
        r.read_exact(&mut m)?;
        let meta: Meta = serde_json::from_slice(&m).context("tensor header")?;
        check(i, &meta)?;
        let kind = parse_kind(&meta.kind)?;
        let mut buf = vec![0u8; meta.bytes()?];
        r.read_exact(&mut buf)?;
        tensors.push(Tensor::f_from_data_size(&buf, &meta.shape, kind)?);
    }
    Ok((header, tensors))
}

/// A pipe end with a deadline on every read and write: a host that stops answering (an
/// endless loop in the module) or stops reading is noticed, not waited for.
struct Timed<'a, F> {
    file: &'a mut F,
    deadline: Instant,
}

impl<F: AsRawFd> Timed<'_, F> {
    fn wait(&self, events: libc::c_short) -> std::io::Result<()> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the backbone's sandbox did not answer in time",
                ));
            }
            let mut p = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms.max(1)) };
            if r > 0 {
                return Ok(());
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

impl<F: AsRawFd + Read> Read for Timed<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            self.wait(libc::POLLIN)?;
            match self.file.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

impl<F: AsRawFd + Write> Write for Timed<'_, F> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            self.wait(libc::POLLOUT)?;
            match self.file.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn set_nonblocking(fd: &impl AsRawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// A running `script-host` child with the module loaded.
struct Host {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Host {
    fn exchange<T: Serialize>(
        &mut self,
        req: &T,
        tensors: &[&Tensor],
        timeout: Duration,
        check: impl FnMut(usize, &Meta) -> anyhow::Result<()>,
    ) -> anyhow::Result<(Reply, Vec<Tensor>)> {
        let deadline = Instant::now() + timeout;
        let mut w = Timed {
            file: &mut self.stdin,
            deadline,
        };
        write_frame(&mut w, req, tensors).context("sending to the backbone's sandbox")?;
        let mut r = Timed {
            file: &mut self.stdout,
            deadline,
        };
        let (reply, tensors) =
            read_frame::<Reply>(&mut r, check).context("reading from the backbone's sandbox")?;
        if let Reply::Error(msg) = reply {
            bail!("{msg}");
        }
        Ok((reply, tensors))
    }
}

/// The module's parameters as the host reported them.
pub struct LoadedParams {
    pub params: Vec<(String, Tensor, bool)>,
    pub confinement: Confinement,
}

/// Start a host for the module at `path` on `device`; returns it with the module's
/// parameters (name, value, requires_grad).
fn start(path: &Path, device: Device, timeout: Duration) -> anyhow::Result<(Host, LoadedParams)> {
    let cfg = config();
    let bytes = std::fs::read(path).context("reading the TorchScript backbone")?;
    let mut cmd = std::process::Command::new(&cfg.exe);
    let dev = crate::device::Device::from_tch(device)
        .unwrap_or(crate::device::Device::Cpu)
        .to_string();
    cmd.arg("script-host")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let allow = if cfg.allow_unconfined { "1" } else { "0" };
    sandbox::contain(
        &mut cmd,
        &[
            ("VIDTUNE_SANDBOX_ALLOW_UNCONFINED", allow.as_ref()),
            ("VIDTUNE_SCRIPT_DEVICE", dev.as_ref()),
        ],
        &Limits {
            memory_bytes: matches!(device, Device::Cpu).then_some(cfg.memory_bytes),
            cpu_secs: None,
            file_bytes: Some(0),
            open_files: Some(256),
            processes: Some(4096),
            drop_privileges: true,
        },
    );
    let mut child = cmd.spawn().context("starting the backbone's sandbox")?;
    let stdin = child.stdin.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    set_nonblocking(&stdin);
    set_nonblocking(&stdout);
    let mut host = Host {
        child,
        stdin,
        stdout,
    };
    // The host first says how it is confined, before it has seen any untrusted byte.
    let deadline = Instant::now() + timeout.max(Duration::from_secs(60));
    let mut r = Timed {
        file: &mut host.stdout,
        deadline,
    };
    let (ready, _) = read_frame::<Reply>(&mut r, |_, _| bail!("unexpected tensor"))
        .context("starting the backbone's sandbox")?;
    let confinement = match ready {
        Reply::Ready(c) => c,
        Reply::Error(msg) => bail!("{msg}"),
        other => bail!("unexpected answer from the backbone's sandbox: {other:?}"),
    };
    let module = Tensor::from_slice(&bytes);
    let module_len = bytes.len() as i64;
    drop(bytes);
    let (reply, values) = host.exchange(
        &Request::Load { device: dev },
        &[&module],
        timeout,
        |_, m| {
            // Parameters: any float shape, but never more bytes than the module file itself
            // (a serialized module holds its parameters).
            if m.bytes()? as i64 > module_len {
                bail!("a parameter larger than the module");
            }
            Ok(())
        },
    )?;
    let Reply::Params(names) = reply else {
        bail!("unexpected answer from the backbone's sandbox: {reply:?}");
    };
    if names.len() != values.len() {
        bail!(
            "the backbone's sandbox sent {} values for {} parameters",
            values.len(),
            names.len()
        );
    }
    let params = names
        .into_iter()
        .zip(values)
        .map(|((n, rg), v)| (n, v.to_device(device), rg))
        .collect();
    Ok((
        host,
        LoadedParams {
            params,
            confinement,
        },
    ))
}

/// The parent's side of a sandboxed backbone inside a `VideoClassifier`.
pub struct Remote {
    path: PathBuf,
    device: Device,
    feature_dim: i64,
    host: Option<Host>,
    /// The parameters as they live in the parent's var store, in the host's order.
    params: Vec<Tensor>,
    /// Their fingerprint when last sent; a mismatch means an optimizer step or a checkpoint
    /// load changed them since (libtorch's version counters do not see writes through
    /// `.data`, which optimizers use).
    synced: Vec<f64>,
    /// The features of the last training forward, awaiting their gradient.
    pending: Option<Tensor>,
    train_mode: bool,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("feature_dim", &self.feature_dim)
            .field("params", &self.params.len())
            .finish()
    }
}

impl Remote {
    /// Start the host and add the module's parameters to the var store under `root`
    /// (as `TrainableCModule` names them: dots become underscores).
    pub fn load(path: &Path, root: &tch::nn::Path, feature_dim: i64) -> anyhow::Result<Self> {
        let device = root.device();
        let (host, loaded) = start(path, device, config().call_timeout)?;
        let mut params = Vec::new();
        for (name, value, requires_grad) in loaded.params {
            params.push(root.add(&name.replace('.', "_"), value, requires_grad));
        }
        Ok(Self {
            path: path.to_path_buf(),
            device,
            feature_dim,
            host: Some(host),
            synced: Vec::new(),
            params,
            pending: None,
            train_mode: false,
        })
    }

    fn host(&mut self) -> anyhow::Result<&mut Host> {
        if self.host.is_none() {
            // A host killed for a timeout or crash is replaced; the parameters are resent.
            let (host, loaded) = start(&self.path, self.device, config().call_timeout)?;
            if loaded.params.len() != self.params.len() {
                bail!("the TorchScript backbone changed");
            }
            self.synced.clear();
            self.host = Some(host);
        }
        Ok(self.host.as_mut().expect("started above"))
    }

    /// Per parameter its sum and sum of squares: one cheap pass (a forward reads every
    /// weight anyway), and no optimizer step or checkpoint load leaves both unchanged.
    fn fingerprint(&self) -> Vec<f64> {
        let _g = tch::no_grad_guard();
        if self.params.is_empty() {
            return Vec::new();
        }
        let parts: Vec<Tensor> = self
            .params
            .iter()
            .flat_map(|p| {
                let p = p.to_kind(Kind::Double);
                [p.sum(Kind::Double), p.square().sum(Kind::Double)]
            })
            .collect();
        Vec::<f64>::try_from(Tensor::stack(&parts, 0).to_device(Device::Cpu)).unwrap_or_default()
    }

    fn sync(&mut self) -> anyhow::Result<()> {
        let versions = self.fingerprint();
        if versions == self.synced {
            return Ok(());
        }
        let params: Vec<Tensor> = self.params.iter().map(Tensor::detach).collect();
        let refs: Vec<&Tensor> = params.iter().collect();
        let timeout = config().call_timeout;
        self.host()?
            .exchange(&Request::SetParams, &refs, timeout, |_, _| {
                bail!("unexpected tensor")
            })?;
        self.synced = versions;
        Ok(())
    }

    fn call(
        &mut self,
        req: Request,
        input: &Tensor,
        check: impl FnMut(usize, &Meta) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<Tensor>> {
        let timeout = config().call_timeout;
        let result = self.host()?.exchange(&req, &[input], timeout, check);
        if result.is_err() {
            // Whatever state the host is in, it is not trusted again.
            self.host = None;
        }
        Ok(result?.1)
    }

    /// Features `[N, D]` of `x` (`[N, 3, T, H, W]`). With `keep_graph` the host keeps the
    /// graph for [`Remote::finish_backward`] and the result requires grad.
    pub fn features(
        &mut self,
        x: &Tensor,
        train: bool,
        keep_graph: bool,
    ) -> anyhow::Result<Tensor> {
        self.sync()?;
        self.train_mode = train;
        let n = x.size()[0];
        let d = self.feature_dim;
        let x = x.detach().to_kind(Kind::Float);
        let out = self.call(Request::Forward { train, keep_graph }, &x, |_, m| {
            if m.shape != [n, d] || m.kind != "f32" {
                bail!(
                    "the module must return [N, {d}] float features; for N = {n} it returned {:?}",
                    m.shape
                );
            }
            Ok(())
        })?;
        let f = out
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no features"))?;
        let f = f.to_device(self.device);
        if keep_graph {
            let f = f.set_requires_grad(true);
            self.pending = Some(f.shallow_clone());
            return Ok(f);
        }
        self.pending = None;
        Ok(f)
    }

    /// After the parent's `backward`: send the features' gradient to the host and add the
    /// parameters' gradients it returns to the parent's own. `sum(p * g)` has gradient `g`
    /// with respect to `p`, so one small backward accumulates them exactly as libtorch would.
    pub fn finish_backward(&mut self) -> anyhow::Result<()> {
        let Some(f) = self.pending.take() else {
            return Ok(());
        };
        let g = f.grad();
        if !g.defined() {
            return Ok(());
        }
        let shapes: Vec<Vec<i64>> = self.params.iter().map(Tensor::size).collect();
        let g = g.to_kind(Kind::Float);
        let grads = self.call(Request::Backward, &g, |i, m| match shapes.get(i) {
            Some(s) if *s == m.shape => Ok(()),
            _ => bail!("a gradient that matches no parameter"),
        })?;
        if grads.len() != self.params.len() {
            bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        let mut surrogate: Option<Tensor> = None;
        for (p, g) in self.params.iter().zip(grads) {
            if !p.requires_grad() {
                continue;
            }
            let term = (p * g.to_device(self.device).to_kind(p.kind())).sum(Kind::Float);
            surrogate = Some(match surrogate {
                None => term,
                Some(s) => s + term,
            });
        }
        if let Some(s) = surrogate {
            s.backward();
        }
        Ok(())
    }
}

/// Try a module on a zero clip `[2, 3, frames, crop, crop]` in a host: its feature width.
pub fn inspect(path: &Path, frames: i64, crop: i64, timeout: Duration) -> anyhow::Result<i64> {
    let (mut host, _) = start(path, Device::Cpu, timeout)?;
    let x = Tensor::zeros([2, 3, frames, crop, crop], (Kind::Float, Device::Cpu));
    let (_, out) = host.exchange(
        &Request::Forward {
            train: false,
            keep_graph: false,
        },
        &[&x],
        timeout,
        |_, m| {
            if m.shape.len() != 2 || m.shape[0] != 2 || !(1..=MAX_FEATURE_DIM).contains(&m.shape[1])
            {
                bail!(
                    "the module must return [N, D] features; for N = 2 it returned {:?}",
                    m.shape
                );
            }
            if m.kind != "f32" {
                bail!("the module must return float features, not {}", m.kind);
            }
            Ok(())
        },
    )?;
    Ok(out[0].size()[1])
}

/// Warm libtorch up before the lock-down: the first convolution and matmul read CPU facts
/// from `/proc` and `/sys` and load kernels; after the lock-down they could not.
fn warm_up(device: Device) {
    let _guard = tch::no_grad_guard();
    let x = Tensor::ones([1, 2, 2, 4, 4], (Kind::Float, device));
    let w = Tensor::ones([2, 2, 1, 3, 3], (Kind::Float, device)).set_requires_grad(true);
    drop(_guard);
    let y = x.conv3d(&w, None::<Tensor>, [1, 1, 1], [0, 1, 1], [1, 1, 1], 1);
    y.sum(Kind::Float).backward();
    let m = Tensor::ones([8, 8], (Kind::Float, device));
    let _ = m.matmul(&m).relu().mean(Kind::Float).double_value(&[]);
}

/// Entry point of `vidtune script-host`: lock down, then load and run one module.
pub fn host_main() -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut r = stdin.lock();
    let mut w = std::io::BufWriter::new(stdout.lock());
    warm_up(Device::Cpu);
    let mut readable = Vec::new();
    let mut devices = Vec::new();
    // The parent says which GPU, if any, before anything untrusted arrives: that device's
    // context is made now, and its device files stay reachable.
    if let Some(crate::device::Device::Cuda(i)) = std::env::var("VIDTUNE_SCRIPT_DEVICE")
        .ok()
        .and_then(|d| crate::device::Device::parse(&d))
    {
        warm_up(Device::Cuda(i));
        (readable, devices) = sandbox::gpu_paths();
    }
    // After the warm-ups: the libraries they loaded are among those kept readable.
    readable.extend(sandbox::loaded_library_dirs());
    let allow = std::env::var("VIDTUNE_SANDBOX_ALLOW_UNCONFINED").as_deref() == Ok("1");
    let confined = sandbox::lock_down(&readable, &devices);
    let confinement = match confined {
        Ok(c) if c.is_complete() || allow => c,
        Ok(c) => {
            let msg = format!(
                "the kernel cannot confine custom backbones (landlock ABI {}, seccomp {}); \
                 see `vidtune doctor`",
                c.landlock_abi, c.seccomp
            );
            write_frame(&mut w, &Reply::Error(msg), &[])?;
            return Ok(());
        }
        Err(e) if allow => {
            eprintln!("warning: sandbox incomplete: {e}");
            Confinement::default()
        }
        Err(e) => {
            write_frame(
                &mut w,
                &Reply::Error(format!("cannot confine the backbone: {e}")),
                &[],
            )?;
            return Ok(());
        }
    };
    write_frame(&mut w, &Reply::Ready(confinement), &[])?;

    let mut module: Option<tch::CModule> = None;
    let mut params: Vec<Tensor> = Vec::new();
    let mut graph: Option<Tensor> = None;
    let mut device = Device::Cpu;
    loop {
        let (req, tensors) = match read_frame::<Request>(&mut r, |_, _| Ok(())) {
            Ok(m) => m,
            Err(e) => {
                // The parent closed our stdin: done.
                if e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof)
                {
                    return Ok(());
                }
                return Err(e);
            }
        };
        let answer = (|| -> anyhow::Result<(Reply, Vec<Tensor>)> {
            match req {
                Request::Load { device: d } => {
                    device = crate::device::Device::parse(&d)
                        .ok_or_else(|| anyhow::anyhow!("unknown device `{d}`"))?
                        .to_tch();
                    let bytes = tensors
                        .first()
                        .ok_or_else(|| anyhow::anyhow!("no module"))?;
                    let mut buf = vec![0u8; bytes.numel()];
                    bytes.copy_data_u8(&mut buf, bytes.numel());
                    let m = tch::CModule::load_data_on_device(&mut buf.as_slice(), device)
                        .map_err(|e| anyhow::anyhow!("not a TorchScript module: {e}"))?;
                    let named = m.named_parameters()?;
                    let names = named
                        .iter()
                        .map(|(n, t)| (n.clone(), t.requires_grad()))
                        .collect();
                    params = named.iter().map(|(_, t)| t.shallow_clone()).collect();
                    let values: Vec<Tensor> = params.iter().map(Tensor::detach).collect();
                    module = Some(m);
                    Ok((Reply::Params(names), values))
                }
                Request::SetParams => {
                    if tensors.len() != params.len() {
                        bail!("{} values for {} parameters", tensors.len(), params.len());
                    }
                    let _g = tch::no_grad_guard();
                    for (p, v) in params.iter_mut().zip(&tensors) {
                        p.copy_(&v.to_device(device));
                    }
                    Ok((Reply::Done, vec![]))
                }
                Request::Forward { train, keep_graph } => {
                    let m = module
                        .as_mut()
                        .ok_or_else(|| anyhow::anyhow!("no module"))?;
                    if train {
                        m.set_train();
                    } else {
                        m.set_eval();
                    }
                    let x = tensors.first().ok_or_else(|| anyhow::anyhow!("no input"))?;
                    let x = x.to_device(device);
                    let out = if keep_graph {
                        m.forward_ts(&[x])
                    } else {
                        tch::no_grad(|| m.forward_ts(&[x]))
                    }
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "the module does not accept a [N, 3, T, H, W] float clip: {e}"
                        )
                    })?;
                    let features = out.to_kind(Kind::Float);
                    let sent = features.detach();
                    graph = keep_graph.then_some(features);
                    Ok((Reply::Features, vec![sent]))
                }
                Request::Backward => {
                    let f = graph
                        .take()
                        .ok_or_else(|| anyhow::anyhow!("no graph to differentiate"))?;
                    let g = tensors
                        .first()
                        .ok_or_else(|| anyhow::anyhow!("no gradient"))?;
                    for p in &params {
                        let mut grad = p.grad();
                        if grad.defined() {
                            let _ = grad.zero_();
                        }
                    }
                    // sum(f * g) has gradient g with respect to f: its backward is the
                    // vector-Jacobian product the parent asked for.
                    (&f * g.to_device(device)).sum(Kind::Float).backward();
                    let grads = params
                        .iter()
                        .map(|p| {
                            let g = p.grad();
                            if g.defined() {
                                g.detach().copy()
                            } else {
                                p.detach().zeros_like()
                            }
                        })
                        .collect();
                    Ok((Reply::Grads, grads))
                }
            }
        })();
        match answer {
            Ok((reply, tensors)) => {
                let refs: Vec<&Tensor> = tensors.iter().collect();
                write_frame(&mut w, &reply, &refs)?;
            }
            Err(e) => write_frame(&mut w, &Reply::Error(format!("{e:#}")), &[])?,
        }
    }
}
