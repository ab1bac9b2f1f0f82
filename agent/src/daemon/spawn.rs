//! Starts a step's first process: with a vfork-style `clone3` (the child
//! shares the agent's memory until its exec, so no page tables are copied)
//! straight into its build's cgroup (`CLONE_INTO_CGROUP`: no migration after
//! the fork, which costs the kernel 5–20 ms after an idle spell), in a
//! process group of its own, at the build's priorities, with stdout and
//! stderr on the step's pipe, off the runtime's thread; and waits for it
//! through a pidfd. Kernels, sandboxes or architectures without that clone
//! get a fork whose child moves itself into the cgroup.
#![allow(
    unsafe_code,
    reason = "clone3 into a cgroup and the child's setup between fork and exec have no safe wrapper; each block says why it is sound"
)]

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

use crate::build_processes::priority::ChildPriority;

/// `CLONE_INTO_CGROUP` and `CLONE_PIDFD` (linux/sched.h).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const CLONE_PIDFD: u64 = 0x1000;

/// `struct clone_args` (linux/sched.h), version 2 (with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// What to start.
pub struct StepCommand {
    /// `sh -c <script>`.
    pub script: String,
    pub dir: PathBuf,
    /// The whole environment of the new process.
    pub env: Vec<(OsString, OsString)>,
    /// Receives stdout and stderr.
    pub output: OwnedFd,
    /// The build's cgroup, when it has one.
    pub cgroup: Option<PathBuf>,
    pub priority: ChildPriority,
}

/// A running step process.
#[derive(Debug)]
pub struct StepChild {
    pid: i32,
    /// Readable when the process exits; `None` on kernels without pidfds
    /// (waited for on the blocking pool instead).
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
}

impl StepChild {
    pub fn id(&self) -> Option<u32> {
        Some(self.pid as u32)
    }

    /// Waits for the process to exit and reaps it.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = match &self.pidfd {
            Some(pidfd) => loop {
                let mut ready = pidfd.readable().await?;
                match reap(self.pid, libc::WNOHANG)? {
                    Some(status) => break status,
                    None => ready.clear_ready(),
                }
            },
            None => {
                let pid = self.pid;
                tokio::task::spawn_blocking(move || reap(pid, 0))
                    .await
                    .map_err(std::io::Error::other)??
                    .ok_or_else(|| std::io::Error::other("waitpid returned no status"))?
            }
        };
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for StepChild {
    fn drop(&mut self) {
        if self.status.is_none() {
            // Never leave a zombie: reap it whenever it ends.
            let pid = self.pid;
            std::thread::spawn(move || reap(pid, 0));
        }
    }
}

/// `waitpid(pid, flags)`: `Some(status)` once it exited.
fn reap(pid: i32, flags: libc::c_int) -> std::io::Result<Option<ExitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only to `status`.
        let result = unsafe { libc::waitpid(pid, &mut status, flags) };
        match result {
            0 => return Ok(None),
            r if r == pid => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// `sh` on the step's `PATH` (as `execvp` would find it), else `/bin/sh`.
fn find_sh(env: &[(OsString, OsString)]) -> PathBuf {
    let path = env
        .iter()
        .rev()
        .find(|(name, _)| name == "PATH")
        .map(|(_, value)| value.clone())
        .unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join("sh"))
        .find(|candidate| {
            let Ok(c_path) = CString::new(candidate.as_os_str().as_bytes()) else {
                return false;
            };
            // SAFETY: access() only reads the NUL-terminated path.
            unsafe { libc::access(c_path.as_ptr(), libc::X_OK) == 0 }
        })
        .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

fn c_string(bytes: &[u8], what: &str) -> std::io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// Everything the child touches, prepared before the clone: after it only
/// async-signal-safe system calls run.
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    dir: CString,
}

/// A started process, before it is tied to the runtime.
struct Started {
    pid: i32,
    pidfd: Option<OwnedFd>,
}

/// Starts `command`. Returns once the new process has exec'd (or failed to:
/// then the error names the step's shell or directory problem).
///
/// The clone and the wait for the exec happen on the runtime's blocking
/// pool: the calling task awaits them, and the runtime's thread goes on with
/// everything else meanwhile (a step's process runs at the build's idle
/// priority, and on a busy machine its exec can take a while to be
/// scheduled).
pub async fn spawn(command: StepCommand) -> std::io::Result<StepChild> {
    let started = tokio::task::spawn_blocking(move || start(command))
        .await
        .map_err(|error| std::io::Error::other(format!("the spawning thread failed: {error}")))??;
    let pidfd = started.pidfd.and_then(|owned| {
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until
        // the AsyncFd that owns it is dropped.
        unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }.ok()
    });
    Ok(StepChild {
        pid: started.pid,
        pidfd,
        status: None,
    })
}

/// The blocking half of [`spawn`]: clone, then wait until the child has
/// exec'd.
fn start(command: StepCommand) -> std::io::Result<Started> {
    let program = find_sh(&command.env);
    let prepared = Prepared {
        program: c_string(program.as_os_str().as_bytes(), "the shell's path")?,
        argv: vec![
            c_string(b"sh", "sh")?,
            c_string(b"-c", "-c")?,
            c_string(command.script.as_bytes(), "the step's command")?,
        ],
        envp: command
            .env
            .iter()
            .map(|(name, value)| {
                let mut entry = name.as_bytes().to_vec();
                entry.push(b'=');
                entry.extend_from_slice(value.as_bytes());
                c_string(
                    &entry,
                    &format!("environment variable {}", name.to_string_lossy()),
                )
            })
            .collect::<std::io::Result<_>>()?,
        dir: c_string(command.dir.as_os_str().as_bytes(), "the step's directory")?,
    };
    let mut argv: Vec<*const libc::c_char> = prepared.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = prepared.envp.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());

    let null = fs_err::File::open("/dev/null")?;
    let (error_read, error_write) = std::io::pipe()?;
    let cgroup_dir = match &command.cgroup {
        Some(dir) => Some(open_dir(dir)?),
        None => None,
    };
    let child = ChildSetup {
        program: &prepared.program,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        dir: &prepared.dir,
        stdin: null.as_raw_fd(),
        output: command.output.as_raw_fd(),
        error: error_write.as_raw_fd(),
        priority: command.priority,
        move_into: -1,
    };

    let (pid, pidfd) = match clone_vfork(&child, cgroup_dir.as_ref()) {
        Ok(started) => started,
        Err(error) if matches!(error.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM)) => {
            return Err(error);
        }
        // No clone3 (old kernel, seccomp), no CLONE_INTO_CGROUP or
        // CLONE_CLEAR_SIGHAND, or no vfork-style clone on this architecture:
        // fork, and the child moves itself into the cgroup.
        Err(_) => fork_and_move(&child, command.cgroup.as_deref())?,
    };
    drop(error_write);
    drop(null);
    drop(command.output);
    // Kept until here: the child of a vfork-style clone used them until its
    // exec.
    drop(prepared);
    drop(argv);
    drop(envp);

    // The child closes its end of the error pipe by exec'ing (CLOEXEC), or
    // writes what failed there first. After a vfork-style clone it has
    // already done either when the clone returns.
    let mut report = [0u8; 5];
    let mut read = 0;
    let mut error_read = std::fs::File::from(OwnedFd::from(error_read));
    loop {
        use std::io::Read;
        match error_read.read(&mut report[read..]) {
            Ok(0) => break,
            Ok(n) => {
                read += n;
                if read == report.len() {
                    break;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                // The child's fate is unknown: it is reaped whenever it ends.
                std::thread::spawn(move || reap(pid, 0));
                return Err(error);
            }
        }
    }
    if read == 0 {
        return Ok(Started { pid, pidfd });
    }
    let errno = i32::from_ne_bytes([report[1], report[2], report[3], report[4]]);
    let stage = match report[0] {
        b'd' => format!("cannot enter {}", command.dir.display()),
        b'x' => format!("cannot run {}", program.display()),
        _ => "cannot set up the step's process".to_owned(),
    };
    let _ = reap(pid, 0);
    Err(std::io::Error::new(
        std::io::Error::from_raw_os_error(errno).kind(),
        format!("{stage}: {}", std::io::Error::from_raw_os_error(errno)),
    ))
}

/// `CLONE_VM`, `CLONE_VFORK` and `CLONE_CLEAR_SIGHAND` (linux/sched.h).
#[cfg(target_arch = "x86_64")]
const CLONE_VM: u64 = 0x100;
#[cfg(target_arch = "x86_64")]
const CLONE_VFORK: u64 = 0x4000;
#[cfg(target_arch = "x86_64")]
const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

/// The child's stack for a vfork-style clone: enough for [`ChildSetup::run`]
/// (which allocates nothing) and the libc calls it makes.
#[cfg(target_arch = "x86_64")]
const CHILD_STACK: usize = 64 * 1024;

/// A vfork-style `clone3` (what `posix_spawn` does, plus the cgroup): the
/// child shares this address space — no page tables are copied, nor torn
/// down again at its exec — runs [`ChildSetup::run`] on a stack of its own,
/// and this thread sleeps until the child has exec'd or exited. Straight
/// into `cgroup` when given; every signal the agent handles is back at its
/// default in the child from the start (`CLONE_CLEAR_SIGHAND`), so no
/// handler of the agent ever runs in it. Returns the pid and a pidfd.
#[cfg(target_arch = "x86_64")]
fn clone_vfork(
    child: &ChildSetup<'_>,
    cgroup: Option<&OwnedFd>,
) -> std::io::Result<(i32, Option<OwnedFd>)> {
    let page = 4096;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            CHILD_STACK + page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    /// Unmaps the child's stack once the child no longer runs on it (it
    /// has exec'd or exited when the clone returns).
    struct Mapping(*mut libc::c_void, usize);
    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: the mapping made above, unmapped once.
            unsafe { libc::munmap(self.0, self.1) };
        }
    }
    let mapping = Mapping(stack, CHILD_STACK + page);
    // The lowest page is a guard: an overflow faults instead of writing
    // over whatever lies below.
    // SAFETY: the first page of the mapping made above.
    if unsafe { libc::mprotect(mapping.0, page, libc::PROT_NONE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }

    let mut pidfd: RawFd = -1;
    let mut args = CloneArgs {
        flags: CLONE_VM | CLONE_VFORK | CLONE_PIDFD | CLONE_CLEAR_SIGHAND,
        pidfd: (&raw mut pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: mapping.0 as u64,
        stack_size: (CHILD_STACK + page) as u64,
        ..CloneArgs::default()
    };
    if let Some(dir) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
    }
    extern "C" fn child_entry(setup: *const ChildSetup<'_>) -> ! {
        // SAFETY: `setup` points at the parent's ChildSetup, which stays
        // alive and unchanged while the parent sleeps in the clone.
        unsafe { (*setup).run() }
    }
    let entry: extern "C" fn(*const ChildSetup<'_>) -> ! = child_entry;
    let result: libc::c_long;
    // SAFETY: clone3 with CLONE_VM|CLONE_VFORK: the kernel starts the child
    // with its stack pointer at the top of the mapping above (16-byte
    // aligned), where it calls `child_entry` at once — it never returns into
    // this function's frame, whose stack the parent still uses. The parent
    // sleeps until the child has exec'd or exited, so everything `child`
    // points at stays valid for it; the child allocates nothing and makes
    // only system calls. The syscall instruction clobbers rcx and r11; rdx
    // and r8 survive it in the parent.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r8",
            "call rdx",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => result,
            in("rdi") &raw mut args,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("rdx") entry,
            in("r8") std::ptr::from_ref(child),
            out("rcx") _,
            out("r11") _,
            options(nostack),
        );
    }
    drop(mapping);
    if result < 0 {
        return Err(std::io::Error::from_raw_os_error(-result as i32));
    }
    // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    Ok((result as i32, pidfd))
}

/// No vfork-style clone written for this architecture: the fork path.
#[cfg(not(target_arch = "x86_64"))]
fn clone_vfork(
    _child: &ChildSetup<'_>,
    _cgroup: Option<&OwnedFd>,
) -> std::io::Result<(i32, Option<OwnedFd>)> {
    Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
}

/// The fallback: a plain fork whose child writes itself into `cgroup`
/// before it does anything else. Returns the pid and a pidfd when the
/// kernel has them.
fn fork_and_move(
    child: &ChildSetup<'_>,
    cgroup: Option<&Path>,
) -> std::io::Result<(i32, Option<OwnedFd>)> {
    let procs = match cgroup {
        Some(dir) => Some(
            fs_err::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))?
                .into_file(),
        ),
        None => None,
    };
    let child = ChildSetup {
        move_into: procs.as_ref().map_or(-1, AsRawFd::as_raw_fd),
        ..*child
    };
    // SAFETY: a fork: the child gets a copy of this address space and runs
    // only `child.run`, which makes async-signal-safe system calls on memory
    // prepared before and never returns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child.run();
    }
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd_open has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a fresh descriptor owned by nobody else.
    let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    Ok((pid, pidfd))
}

fn open_dir(dir: &Path) -> std::io::Result<OwnedFd> {
    let c_path = c_string(dir.as_os_str().as_bytes(), "the cgroup path")?;
    // SAFETY: open() reads the NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The child's side: pointers and descriptors prepared before the clone.
#[derive(Clone, Copy)]
struct ChildSetup<'a> {
    program: &'a CStr,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    dir: &'a CStr,
    stdin: RawFd,
    output: RawFd,
    error: RawFd,
    priority: ChildPriority,
    /// `cgroup.procs` of the build's cgroup, for a child that must move
    /// itself (the fork fallback); -1 otherwise.
    move_into: RawFd,
}

impl ChildSetup<'_> {
    /// Runs in the new process: sets it up and execs the shell, or reports
    /// `(stage, errno)` on the error pipe and exits 127. Async-signal-safe
    /// calls only.
    fn run(&self) -> ! {
        // SAFETY: system calls on descriptors and memory that stay valid in
        // this copy of the address space; nothing allocates.
        unsafe {
            let fail = |stage: u8| -> ! {
                let errno = *libc::__errno_location();
                let mut report = [stage, 0, 0, 0, 0];
                report[1..].copy_from_slice(&errno.to_ne_bytes());
                libc::write(self.error, report.as_ptr().cast(), report.len());
                libc::_exit(127);
            };
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Rust ignores SIGPIPE; a shell pipeline must not.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            if self.move_into >= 0 {
                // On failure the step stays in the agent's cgroup: the
                // process-tree accounting and the build marker cover it.
                libc::write(self.move_into, b"0".as_ptr().cast(), 1);
            }
            if libc::setpgid(0, 0) != 0 {
                fail(b'g');
            }
            self.priority.apply_to_self();
            if libc::chdir(self.dir.as_ptr()) != 0 {
                fail(b'd');
            }
            // Above 2 first, so dup2 onto 0..2 never clobbers a source.
            let stdin = libc::fcntl(self.stdin, libc::F_DUPFD_CLOEXEC, 3);
            let output = libc::fcntl(self.output, libc::F_DUPFD_CLOEXEC, 3);
            if stdin < 0
                || output < 0
                || libc::dup2(stdin, 0) < 0
                || libc::dup2(output, 1) < 0
                || libc::dup2(output, 2) < 0
            {
                fail(b'f');
            }
            libc::execve(self.program.as_ptr(), self.argv, self.envp);
            fail(b'x');
        }
    }
}

/// The environment of the agent without what a build must not inherit,
/// then `extra` on top (later entries win).
pub fn step_environment(
    hidden_prefixes: &[&str],
    extra: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(name, _)| {
            let text = name.to_string_lossy();
            !hidden_prefixes
                .iter()
                .any(|prefix| text.starts_with(prefix))
        })
        .collect();
    for (name, value) in extra {
        env.insert(name, value);
    }
    env.into_iter().collect()
}

/// `OsString` pair from anything string-like.
pub fn var(name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> (OsString, OsString) {
    (name.as_ref().to_owned(), value.as_ref().to_owned())
}
