//! Containment for the child processes that touch untrusted bytes or run untrusted code.
//!
//! Two layers, both Linux-only:
//! - [`contain`], applied by the parent to every child it starts (`media-worker`, `train-job`,
//!   `script-host`): a cleared environment (only what the child needs is passed), rlimits,
//!   `PR_SET_PDEATHSIG` so the child dies with its parent, no inherited file descriptors beyond
//!   its pipes, `no_new_privs`, and for code-running children an unprivileged uid when the
//!   server runs as root.
//! - [`lock_down`], applied by a code-running child to itself once it has initialised libtorch
//!   and before it reads a single untrusted byte: Landlock with no filesystem access except
//!   read-only library directories, no TCP, abstract sockets and signals scoped to itself; and a
//!   seccomp filter that refuses new processes, sockets, `ptrace`, namespaces, mounts and the
//!   other system calls a tensor program never needs.
//!
//! The child talks to its parent only over stdin/stdout with a small framed protocol.
use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variables a child may inherit (everything else is cleared): log settings, the
/// heap policy, thread counts and which GPUs are visible.
const PASS_ENV: &[&str] = &[
    "RUST_LOG",
    "RUST_BACKTRACE",
    "VIDTUNE_KEEP_FREED_MEMORY",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NVIDIA_VISIBLE_DEVICES",
    "TZ",
    "LANG",
    "VIDTUNE_SANDBOX_MEMORY_MIB",
    "VIDTUNE_SANDBOX_CALL_SECS",
    "VIDTUNE_ALLOW_UNCONFINED_BACKBONES",
];

/// Resource limits for one child (`None`: inherited from the parent).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Address space (RLIMIT_AS). Not set for CUDA children: the driver maps far more virtual
    /// memory than it uses.
    pub memory_bytes: Option<u64>,
    /// CPU seconds (RLIMIT_CPU): SIGXCPU, then SIGKILL.
    pub cpu_secs: Option<u64>,
    /// Largest file the child may write (RLIMIT_FSIZE); 0 forbids writing files at all.
    pub file_bytes: Option<u64>,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: Option<u64>,
    /// Processes and threads of the child's uid (RLIMIT_NPROC); only meaningful with
    /// `drop_privileges`, where the uid is the sandbox's own.
    pub processes: Option<u64>,
    /// When running as root: switch to the `nobody` uid/gid with no supplementary groups, so
    /// the child cannot read files that are not world-readable even if the other layers fail.
    pub drop_privileges: bool,
}

/// The uid/gid a root server's code-running children take.
const NOBODY: libc::uid_t = 65534;

/// Prepare `cmd` to start contained: cleared environment plus `env`, the limits, death with
/// the parent, and no inherited descriptors except stdin/stdout/stderr.
///
/// The parent must not be a short-lived thread: the kernel delivers `PR_SET_PDEATHSIG` when
/// the *thread* that forked exits. Call this from a tokio worker or a long-lived thread.
pub fn contain(cmd: &mut std::process::Command, env: &[(&str, &OsStr)], limits: &Limits) {
    cmd.env_clear();
    for k in PASS_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut limits = limits.clone();
    // The uid switch is only possible where `nobody` can load this binary and its libraries
    // (not, say, a libtorch inside root's 0700 home); Landlock and seccomp still apply.
    limits.drop_privileges &= nobody_can_run(cmd.get_program().as_ref());
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (prctl, getppid, setrlimit, close_range, setgroups/setgid/setuid); it allocates
    // nothing.
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            let set = |res, v: Option<u64>| -> std::io::Result<()> {
                if let Some(v) = v {
                    let r = libc::rlimit {
                        rlim_cur: v as libc::rlim_t,
                        rlim_max: v as libc::rlim_t,
                    };
                    if libc::setrlimit(res, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            };
            set(libc::RLIMIT_CORE, Some(0))?;
            set(libc::RLIMIT_AS, limits.memory_bytes)?;
            set(libc::RLIMIT_CPU, limits.cpu_secs)?;
            set(libc::RLIMIT_FSIZE, limits.file_bytes)?;
            set(libc::RLIMIT_NOFILE, limits.open_files)?;
            // Every descriptor above stderr closes at exec (std's own exec-error pipe is
            // already close-on-exec, so marking rather than closing keeps its error reporting).
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            if libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                // Kernels before 5.11: close them one by one instead.
                for fd in 3..1024 {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
            if limits.drop_privileges && libc::geteuid() == 0 {
                set(libc::RLIMIT_NPROC, limits.processes)?;
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(NOBODY) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether a world user could execute `exe` and read every library this process has loaded
/// (the child is the same binary, so it loads the same ones).
fn nobody_can_run(exe: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    static LIBS_OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // Every ancestor must be searchable by others, the file itself readable (and executable).
    fn reachable(p: &Path, need: u32) -> bool {
        let Ok(p) = p.canonicalize() else {
            return false;
        };
        let file_ok = std::fs::metadata(&p).is_ok_and(|m| m.permissions().mode() & need == need);
        file_ok
            && p.ancestors()
                .skip(1)
                .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
    }
    let libs_ok = *LIBS_OK.get_or_init(|| loaded_libraries().iter().all(|p| reachable(p, 0o004)));
    libs_ok && reachable(exe, 0o005)
}

/// Which confinement mechanisms a child got.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Confinement {
    /// Landlock ABI version in force, 0 when the kernel has none.
    pub landlock_abi: i32,
    /// Landlock also denies TCP (ABI 4+).
    pub landlock_net: bool,
    /// Landlock scopes abstract unix sockets and signals (ABI 6+).
    pub landlock_scoped: bool,
    /// The seccomp filter is installed.
    pub seccomp: bool,
    /// The child runs under an unprivileged uid (not root).
    pub unprivileged: bool,
}

impl Confinement {
    /// Enough for untrusted code: the filesystem and processes are shut (Landlock + seccomp).
    pub fn is_complete(&self) -> bool {
        self.landlock_abi >= 1 && self.seccomp
    }
}

// Landlock's user-space ABI (linux/landlock.h).
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
const FS_READ_FILE: u64 = 1 << 2;
const FS_READ_DIR: u64 = 1 << 3;
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_IOCTL_DEV: u64 = 1 << 15;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version this kernel offers (0: none).
pub fn landlock_abi() -> i32 {
    // SAFETY: the documented version query: no attribute, size 0.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v < 0 { 0 } else { v as i32 }
}

/// Every filesystem right the given ABI knows, so that each one is denied unless a rule grants it.
fn fs_rights(abi: i32) -> u64 {
    let mut all = (1u64 << 13) - 1; // ABI 1: execute … make_sym
    if abi >= 2 {
        all |= 1 << 13; // refer
    }
    if abi >= 3 {
        all |= 1 << 14; // truncate
    }
    if abi >= 5 {
        all |= 1 << 15; // ioctl_dev
    }
    all
}

/// Confine the calling process for good: no filesystem access except reading (not executing)
/// below `readable` and reading, writing and `ioctl` on the device files in `devices` (a
/// GPU's), no TCP, scoped signals and abstract sockets, and the seccomp filter. Call after
/// initialising libtorch and before touching untrusted input. Where the kernel lacks a
/// mechanism the result says so; the caller decides whether that is acceptable.
pub fn lock_down(readable: &[PathBuf], devices: &[PathBuf]) -> std::io::Result<Confinement> {
    let mut got = Confinement {
        // SAFETY: plain getter.
        unprivileged: unsafe { libc::geteuid() } != 0,
        ..Default::default()
    };
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let abi = landlock_abi();
    if abi >= 1 {
        let attr = RulesetAttr {
            handled_access_fs: fs_rights(abi),
            handled_access_net: if abi >= 4 { 0b11 } else { 0 },
            scoped: if abi >= 6 { 0b11 } else { 0 },
        };
        // Older kernels reject the fields they do not know: pass only the known prefix.
        let size = match abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: attr outlives the call; size is a prefix of the struct.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                size,
                0u32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = fd as libc::c_int;
        let device_rights = FS_READ_FILE | FS_WRITE_FILE | if abi >= 5 { FS_IOCTL_DEV } else { 0 };
        let rules = readable
            .iter()
            .map(|p| (p, false))
            .chain(devices.iter().map(|p| (p, true)));
        for (path, device) in rules {
            let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: c is a valid C string; O_PATH opens are harmless.
            let dfd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if dfd < 0 {
                continue; // a directory or device that does not exist needs no rule
            }
            let is_dir = std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false);
            let rule = PathBeneathAttr {
                // Read only: no FS_EXECUTE, so nothing can be started from there either.
                allowed_access: match (device, is_dir) {
                    (true, _) => device_rights,
                    (false, true) => FS_READ_FILE | FS_READ_DIR,
                    (false, false) => FS_READ_FILE,
                },
                parent_fd: dfd,
            };
            // SAFETY: rule outlives the call.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    fd,
                    LANDLOCK_RULE_PATH_BENEATH,
                    &rule as *const PathBeneathAttr,
                    0u32,
                )
            };
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(dfd) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: closing our own descriptor.
                unsafe { libc::close(fd) };
                return Err(e);
            }
        }
        // SAFETY: fd is the ruleset made above.
        let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) };
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(fd) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        got.landlock_abi = abi;
        got.landlock_net = abi >= 4;
        got.landlock_scoped = abi >= 6;
    }
    seccomp::install()?;
    got.seccomp = true;
    Ok(got)
}

/// The shared libraries mapped into this process now (from `/proc/self/maps`).
fn loaded_libraries() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/') && p.contains(".so"))
        .map(PathBuf::from)
        .collect()
}

/// Directories the dynamic loader may still need after [`lock_down`] (libraries libtorch
/// opens lazily, such as CUDA's NVRTC builtins): those of every library mapped now.
pub fn loaded_library_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = loaded_libraries()
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// What a CUDA host needs beyond its libraries: the NVIDIA device files (opened again by the
/// driver as it creates streams and maps memory) and the driver's facts under /proc and /sys.
pub fn gpu_paths() -> (Vec<PathBuf>, Vec<PathBuf>) {
    let devices = std::fs::read_dir("/dev")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("nvidia"))
                })
                .collect()
        })
        .unwrap_or_default();
    let readable = [
        "/proc/driver/nvidia",
        "/sys/devices",
        "/sys/bus/pci",
        "/sys/module/nvidia",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();
    (readable, devices)
}

mod seccomp {
    //! A small classic-BPF filter: refuse with EPERM what a tensor program never needs.
    //! An allow-list would be tighter, but libtorch, OpenMP and the CUDA driver use a wide and
    //! version-dependent set of calls; the deny-list shuts the doors an attacker wants
    //! (processes, sockets, other processes' memory, namespaces, kernel interfaces), and
    //! Landlock shuts the filesystem.
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xC000_00B7;

    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_KILL_PROCESS: u32 = 0x8000_0000;

    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K

    // struct seccomp_data offsets.
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    const ARG0_LO: u32 = 16;

    fn denied() -> Vec<libc::c_long> {
        let mut v = vec![
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept4,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_kexec_load,
            libc::SYS_reboot,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_io_uring_setup,
            libc::SYS_userfaultfd,
            libc::SYS_pidfd_open,
            libc::SYS_pidfd_getfd,
            libc::SYS_kcmp,
            libc::SYS_setuid,
            libc::SYS_setgid,
            libc::SYS_setreuid,
            libc::SYS_setregid,
            libc::SYS_setresuid,
            libc::SYS_setresgid,
        ];
        #[cfg(target_arch = "x86_64")]
        v.extend([libc::SYS_fork, libc::SYS_vfork, libc::SYS_accept]);
        v
    }

    #[repr(C)]
    struct SockFilter {
        code: u16,
        jt: u8,
        jf: u8,
        k: u32,
    }

    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }

    fn stmt(code: u16, k: u32) -> SockFilter {
        SockFilter {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }

    fn jump(code: u16, k: u32, jt: u8, jf: u8) -> SockFilter {
        SockFilter { code, jt, jf, k }
    }

    pub fn install() -> std::io::Result<()> {
        let eperm = RET_ERRNO | libc::EPERM as u32;
        let mut prog = vec![
            // A foreign architecture's numbers mean other calls: kill.
            stmt(LD_W_ABS, ARCH),
            jump(JEQ_K, AUDIT_ARCH, 1, 0),
            stmt(RET_K, RET_KILL_PROCESS),
            stmt(LD_W_ABS, NR),
        ];
        for nr in denied() {
            prog.push(jump(JEQ_K, nr as u32, 0, 1));
            prog.push(stmt(RET_K, eperm));
        }
        // clone3 passes its flags in memory the filter cannot read: ENOSYS makes the C library
        // fall back to clone, whose flags it can.
        prog.push(jump(JEQ_K, libc::SYS_clone3 as u32, 0, 1));
        prog.push(stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32));
        // clone: threads (CLONE_THREAD) yes, new processes no.
        prog.push(jump(JEQ_K, libc::SYS_clone as u32, 0, 4));
        prog.push(stmt(LD_W_ABS, ARG0_LO));
        prog.push(jump(JSET_K, libc::CLONE_THREAD as u32, 0, 1));
        prog.push(stmt(RET_K, RET_ALLOW));
        prog.push(stmt(RET_K, eperm));
        prog.push(stmt(RET_K, RET_ALLOW));
        let fprog = SockFprog {
            len: prog.len() as u16,
            filter: prog.as_ptr(),
        };
        // SAFETY: fprog points at prog, alive for the call; no_new_privs was set by the caller.
        let r = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const SockFprog,
                0,
                0,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What the `sandbox-probe` child could still do after locking itself down: the confinement
/// checked by trying, not by asking the kernel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub confinement: Confinement,
    /// Each attempt and how it ended (`denied: …` or `ALLOWED`).
    pub attempts: Vec<(String, String)>,
}

impl Probe {
    /// Whether every attempt was refused.
    pub fn all_denied(&self) -> bool {
        self.attempts.iter().all(|(_, r)| r.starts_with("denied"))
    }
}

/// The `sandbox-probe` child: lock down as a script host does, then try to read `read`, write
/// `write`, open a TCP socket to the database port, start `/bin/sh` and fork; print a [`Probe`].
pub fn probe_main(read: &Path, write: &Path) -> anyhow::Result<()> {
    let confinement = lock_down(&loaded_library_dirs(), &[])?;
    let outcome = |r: std::io::Result<()>| match r {
        Ok(()) => "ALLOWED".to_owned(),
        Err(e) => format!("denied: {e}"),
    };
    let mut attempts = vec![
        (
            format!("read {}", read.display()),
            outcome(std::fs::read(read).map(drop)),
        ),
        (
            format!("write {}", write.display()),
            outcome(std::fs::write(write, b"written from the sandbox")),
        ),
        (
            "tcp connect 127.0.0.1:5432".into(),
            outcome(std::net::TcpStream::connect("127.0.0.1:5432").map(drop)),
        ),
        (
            "spawn /bin/sh".into(),
            outcome(
                std::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg("true")
                    .status()
                    .map(drop),
            ),
        ),
    ];
    // SAFETY: fork in a single-threaded probe; the child only _exits.
    let pid = unsafe { libc::fork() };
    let forked = if pid < 0 {
        Err(std::io::Error::last_os_error())
    } else if pid == 0 {
        // SAFETY: leave the forked copy at once.
        unsafe { libc::_exit(0) }
    } else {
        Ok(())
    };
    attempts.push(("fork".into(), outcome(forked)));
    println!(
        "{}",
        serde_json::to_string(&Probe {
            confinement,
            attempts
        })?
    );
    Ok(())
}

/// Run the probe child contained as script hosts are, and report what it could do.
pub fn probe(exe: &Path, read: &Path, write: &Path) -> anyhow::Result<Probe> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("sandbox-probe").arg(read).arg(write);
    contain(
        &mut cmd,
        &[],
        &Limits {
            // libtorch's CUDA libraries alone map several GiB of address space.
            memory_bytes: Some(16 << 30),
            cpu_secs: Some(10),
            file_bytes: Some(0),
            open_files: Some(64),
            processes: Some(64),
            drop_privileges: true,
        },
    );
    let out = cmd.stderr(std::process::Stdio::piped()).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "the sandbox probe failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Check, by trying, that this machine confines code-running children: a probe child must be
/// refused a secret file, a write, TCP, a process and a fork. `scratch` holds the probe's files
/// for the duration. The summary says what protects the children (`vidtune doctor` prints it).
pub fn verify(exe: &Path, scratch: &Path) -> anyhow::Result<String> {
    let dir = scratch.join(format!("sandbox-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (secret, target) = (dir.join("secret"), dir.join("written"));
    std::fs::write(&secret, "a file the sandbox must not read")?;
    let result = probe(exe, &secret, &target);
    let written = target.exists();
    let _ = std::fs::remove_dir_all(&dir);
    let p = result?;
    let c = &p.confinement;
    let leaks: Vec<&str> = p
        .attempts
        .iter()
        .filter(|(_, r)| !r.starts_with("denied"))
        .map(|(what, _)| what.as_str())
        .collect();
    if !c.is_complete() || !leaks.is_empty() || written {
        anyhow::bail!(
            "custom backbones cannot be confined here (landlock ABI {}, seccomp {}; allowed: {})",
            c.landlock_abi,
            c.seccomp,
            if leaks.is_empty() {
                "-".to_owned()
            } else {
                leaks.join(", ")
            }
        );
    }
    Ok(format!(
        "confined: landlock ABI {} ({}{}), seccomp filter, {}",
        c.landlock_abi,
        "no files",
        match (c.landlock_net, c.landlock_scoped) {
            (true, true) => ", no TCP, scoped signals and sockets",
            (true, false) => ", no TCP",
            _ => "",
        },
        if c.unprivileged {
            "an unprivileged uid"
        } else {
            "uid root kept (libtorch is not readable by other users, so `nobody` could not load it)"
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_contained_child_gets_a_cleared_environment_and_no_inherited_descriptors() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("VIDTUNE_TEST_SECRET", "hunter2") };
        // A descriptor without close-on-exec, as a careless library would leave one.
        let path = std::ffi::CString::new("/dev/null").unwrap();
        // SAFETY: valid C string; the descriptor is closed below.
        let leaked = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
        assert!(leaked > 2);
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg("env; ls /proc/self/fd");
        contain(&mut cmd, &[("GIVEN", "yes".as_ref())], &Limits::default());
        let out = cmd.stdout(Stdio::piped()).output().unwrap();
        // SAFETY: our own descriptor.
        unsafe { libc::close(leaked) };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("GIVEN=yes"), "{text}");
        let fds: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        // stdin, stdout, stderr and the descriptor `ls` opens for /proc/self/fd itself.
        assert!(
            !fds.contains(&leaked) || leaked == 3,
            "{fds:?} leaked {leaked}"
        );
        assert!(fds.iter().all(|&fd| fd <= 3), "{fds:?}");
    }

    #[test]
    fn a_contained_child_dies_with_the_thread_that_started_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cmd = Command::new("/bin/sleep");
            cmd.arg("300");
            contain(&mut cmd, &[], &Limits::default());
            // Reaped below by pid, after the thread that owned it is gone.
            #[expect(clippy::zombie_processes, reason = "waited for with waitpid below")]
            let child = cmd.spawn().unwrap();
            tx.send(child.id()).unwrap();
            // The thread ends here without waiting: the parent is gone for the child.
        })
        .join()
        .unwrap();
        let pid = rx.recv().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for us to reap it.
            if stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "child {pid} outlived its parent"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
    }

    #[test]
    fn rlimits_bound_what_a_child_may_allocate_and_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(format!(
            "head -c 100000 /dev/zero > {}/big",
            dir.path().display()
        ));
        contain(
            &mut cmd,
            &[],
            &Limits {
                file_bytes: Some(4096),
                ..Default::default()
            },
        );
        let status = cmd.status().unwrap();
        assert!(!status.success());
        let written = std::fs::metadata(dir.path().join("big")).map_or(0, |m| m.len());
        assert!(written <= 4096, "{written} bytes written");
    }
}
