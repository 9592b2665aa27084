//! The compile child's system-call filter: what a compile needs is memory, threads and the
//! pipes it was given, so once its engine is built and its input read, every system call that
//! reaches past that fails with `EPERM` (seccomp, through `seccompiler`).
//!
//! The adversary: a plugin file crafted to take over the compiler (a bug in the parser or in
//! cranelift). The child runs as the host's user, so without this it could read the compile
//! cache's key (and have the host run native code of its choosing as a cached artifact), read
//! every plugin's kv in `data_dir`, open sockets, or signal, trace or renice the host.
//! With it, it can open no file and no socket, change no file by its path (modes, times,
//! attributes), watch none, start no program and make no process (threads only: a process of
//! its own would escape the caps), touch no other process (a signal only to itself: `abort`
//! must still work; no descriptor's signals sent elsewhere), mount nothing, leave no memory
//! behind (System V IPC, POSIX queues), and change none of its own caps. Writing
//! to a file it holds is capped at 0 bytes already (`RLIMIT_FSIZE`), and it holds only its
//! pipes (`close_range`).
//!
//! What it does not close: the compiled code the child hands back is what the host runs (it
//! is trusted as the host's own output, and kept in the cache under the host's tag), so a
//! compiler taken over could still hand back code of its choosing. That is no worse than
//! compiling in the host's own process, where such a compiler would own the host at once;
//! the filter closes every other way out of the child.
//!
//! A deny list, not an allow list: the calls a compile makes (the allocator's, the threads',
//! glibc's at start) differ by platform and version, and a call missing from an allow list
//! would fail compiles on some machine; a call missing from this list is one that reaches
//! nothing the child holds. On x86_64 the x32 numbers of the same calls are denied too (the
//! same architecture to seccomp, another number). A call newer than this list is allowed: the
//! list is to be read again as kernels grow. Best effort where seccomp is missing, denied by
//! the host's own filter (the shipped unit allows it), or the architecture unknown: the other
//! caps stand, and the child says so on its stderr, which the host logs.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Calls denied whatever their arguments.
const DENIED: &[libc::c_long] = &[
    // Files: opening, making, removing, renaming, changing.
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_mknodat,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_fchownat,
    libc::SYS_truncate,
    libc::SYS_utimensat,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    SYS_SETXATTRAT,
    SYS_REMOVEXATTRAT,
    libc::SYS_inotify_add_watch,
    libc::SYS_fanotify_init,
    libc::SYS_memfd_create,
    // The mount API (file systems and trees of them, in a namespace of its own).
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_mount_setattr,
    // Memory and queues that outlive the process (System V IPC, POSIX queues): nothing the
    // memory cap sees.
    libc::SYS_shmget,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_msgget,
    libc::SYS_msgsnd,
    libc::SYS_msgctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semctl,
    libc::SYS_mq_open,
    libc::SYS_mq_unlink,
    libc::SYS_mq_timedsend,
    // Sockets.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    // Other processes: tracing, reading or moving their memory, their descriptors.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_process_madvise,
    libc::SYS_migrate_pages,
    libc::SYS_move_pages,
    libc::SYS_kcmp,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_pidfd_send_signal,
    libc::SYS_tkill,
    // Scheduling and limits (its own are set; another process's must not be).
    libc::SYS_setpriority,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_ioprio_set,
    libc::SYS_setrlimit,
    libc::SYS_prlimit64,
    // Programs, namespaces, mounts, kernel interfaces a compile never needs.
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
];

/// `setxattrat` and `removexattrat` (Linux 6.13; one number on every architecture since 424).
const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

/// The same on x86_64, by their older numbers.
#[cfg(target_arch = "x86_64")]
const DENIED_LEGACY: &[libc::c_long] = &[
    libc::SYS_fork,
    libc::SYS_vfork,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_futimesat,
    libc::SYS_inotify_init,
    libc::SYS_open,
    libc::SYS_creat,
    libc::SYS_mknod,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_rename,
    libc::SYS_link,
    libc::SYS_symlink,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_lchown,
];
#[cfg(not(target_arch = "x86_64"))]
const DENIED_LEGACY: &[libc::c_long] = &[];

/// Calls denied unless their first argument is this process (a signal to itself is how
/// `abort` ends it; to another process, never).
const OWN_PID_ONLY: &[libc::c_long] =
    &[libc::SYS_kill, libc::SYS_tgkill, libc::SYS_rt_sigqueueinfo, libc::SYS_rt_tgsigqueueinfo];

/// `fcntl` commands and `ioctl` requests that set who gets a descriptor's signals: with them,
/// a write to its own pipe would signal any process of the same user (`F_SETOWN`, `F_SETSIG`,
/// `F_SETOWN_EX`; `FIOSETOWN`, `SIOCSPGRP`).
const SIGNAL_OWNER_FCNTL: &[u64] = &[8, 10, 15];
const SIGNAL_OWNER_IOCTL: &[u64] = &[0x8901, 0x8902];

/// On x86_64, a call's x32 number is its number with this bit set, and the x32 calls that take
/// other arguments than their 64-bit twins have numbers of their own, from 512 up (to 547).
#[cfg(target_arch = "x86_64")]
const X32: Option<(libc::c_long, std::ops::RangeInclusive<libc::c_long>)> = Some((0x4000_0000, 512..=547));
#[cfg(not(target_arch = "x86_64"))]
const X32: Option<(libc::c_long, std::ops::RangeInclusive<libc::c_long>)> = None;

/// The filter for this process (whose pid `own_pid` is), as a BPF program: calls above fail
/// with `EPERM`, every other is allowed.
pub fn filter(own_pid: u32) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &call in DENIED.iter().chain(DENIED_LEGACY) {
        rules.insert(call, Vec::new());
    }
    for &call in OWN_PID_ONLY {
        rules.insert(call, vec![rule(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, u64::from(own_pid))?]);
    }
    let any_of = |values: &[u64]| -> Result<Vec<SeccompRule>, String> {
        values.iter().map(|&v| rule(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)).collect()
    };
    rules.insert(libc::SYS_fcntl, any_of(SIGNAL_OWNER_FCNTL)?);
    rules.insert(libc::SYS_ioctl, any_of(SIGNAL_OWNER_IOCTL)?);
    // A process of its own would escape the caps (the parent watches one pid; RLIMIT_CPU starts
    // again in each): `clone` makes threads only.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![rule(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(thread), 0)?]);
    if let Some((bit, own_numbers)) = X32 {
        // Every x32-only number too: x32 is no way round.
        rules.extend(own_numbers.map(|call| (call | bit, Vec::new())));
    }
    program(rules, libc::EPERM)
}

/// `clone3` passes its flags in memory, where a filter cannot look: it fails with `ENOSYS`,
/// and glibc then starts threads with `clone` (whose flags [`filter`] reads).
pub fn clone3_filter() -> Result<BpfProgram, String> {
    program(BTreeMap::from([(libc::SYS_clone3, Vec::new())]), libc::ENOSYS)
}

/// A rule of one condition on a call's argument `arg`.
fn rule(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> Result<SeccompRule, String> {
    let condition = SeccompCondition::new(arg, len, op, value).map_err(|e| e.to_string())?;
    SeccompRule::new(vec![condition]).map_err(|e| e.to_string())
}

/// The BPF program that answers `errno` to the calls `rules` match (each by its x32 number
/// too), and allows every other.
fn program(mut rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, String> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    if let Some((bit, _)) = X32 {
        let by_x32: Vec<(i64, Vec<SeccompRule>)> = rules.iter().map(|(call, r)| (call | bit, r.clone())).collect();
        rules.extend(by_x32);
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch)
        .map_err(|e| e.to_string())?;
    filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())
}

/// Installs [`filter`] and [`clone3_filter`] on every thread of this process (and so on every
/// thread it starts later). `Err` says why it could not (a host whose own filter denies
/// `seccomp`, a kernel without it): the caller goes on under its other caps, and says so.
pub fn enter() -> Result<(), String> {
    let (main, clone3) = (filter(std::process::id())?, clone3_filter()?);
    seccompiler::apply_filter_all_threads(&clone3).map_err(|e| format!("entering the clone3 filter: {e}"))?;
    seccompiler::apply_filter_all_threads(&main).map_err(|e| format!("entering the system-call filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    /// In a thread of its own (the filter is the calling thread's only: `apply_filter`), so the
    /// test process is untouched.
    #[test]
    fn a_jailed_thread_opens_no_file_or_socket_signals_no_other_process_and_still_compiles() {
        let (program, clone3) = (filter(std::process::id()).unwrap(), clone3_filter().unwrap());
        let outcome = std::thread::spawn(move || {
            seccompiler::apply_filter(&clone3).unwrap();
            seccompiler::apply_filter(&program).unwrap();
            let open = std::fs::File::open("/proc/self/status").map(|_| ()).map_err(|e| e.kind());
            // Threads still start (glibc falls back from clone3 to clone); a process does not.
            let thread = std::thread::spawn(|| 7).join().ok();
            // SAFETY: a raw fork in a test thread; the child (if one were made) exits at once.
            let fork = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) };
            if fork == 0 {
                unsafe { libc::_exit(0) };
            }
            // Who gets a pipe's signals cannot be set.
            let mut fds = [0; 2];
            // SAFETY: pipe writes two descriptors into `fds`; fcntl and close take them.
            let owner = unsafe {
                libc::pipe(fds.as_mut_ptr());
                let owner = libc::fcntl(fds[0], libc::F_SETOWN, libc::getppid());
                let flags = libc::fcntl(fds[0], libc::F_GETFL);
                libc::close(fds[0]);
                libc::close(fds[1]);
                (owner, flags >= 0)
            };
            let socket = std::net::TcpListener::bind("127.0.0.1:0").map(|_| ()).map_err(|e| e.kind());
            // SAFETY: signal 0 only asks whether the process may be signalled.
            let parent = unsafe { libc::kill(libc::getppid(), 0) };
            // SAFETY: as above, to this process: allowed.
            let own = unsafe { libc::kill(libc::getpid(), 0) };
            // What the child does once jailed: compile a component (on this thread alone).
            let mut config = wasmtime::Config::new();
            config.parallel_compilation(false);
            let engine = wasmtime::Engine::new(&config).unwrap();
            // A component of one core module of one function, `() -> i32 { 42 }`: cranelift runs.
            let module: &[u8] =
                b"\0asm\x01\0\0\0\x01\x05\x01\x60\0\x01\x7f\x03\x02\x01\0\x0a\x06\x01\x04\0\x41\x2a\x0b";
            let mut component = b"\0asm\x0d\0\x01\0\x01".to_vec();
            component.push(module.len() as u8);
            component.extend_from_slice(module);
            let compiled = wasmtime::component::Component::new(&engine, &component).map(|c| c.serialize().is_ok());
            (open, socket, parent, own, compiled.map_err(|e| e.to_string()), thread, fork, owner)
        })
        .join()
        .unwrap();
        let (open, socket, parent, own, compiled, thread, fork, owner) = outcome;
        assert_eq!(thread, Some(7), "a thread could not start");
        assert_eq!(fork, -1, "a process was made");
        assert_eq!(owner, (-1, true), "F_SETOWN was allowed, or every fcntl was denied");
        assert_eq!(open, Err(ErrorKind::PermissionDenied));
        assert_eq!(socket, Err(ErrorKind::PermissionDenied));
        assert_eq!(parent, -1, "signalled its parent");
        assert_eq!(own, 0, "could not signal itself");
        assert_eq!(compiled, Ok(true));
        // The rest of the process is not jailed.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }

    #[test]
    fn every_denied_call_is_denied_by_its_x32_number_too() {
        let Some((bit, _)) = X32 else { return };
        let program = filter(1).unwrap();
        // The syscall numbers compared against: `BPF_JMP | BPF_JEQ | BPF_K` instructions' values.
        let words: Vec<u32> = program.iter().filter(|f| f.code == 0x15).map(|f| f.k).collect();
        for &call in DENIED.iter().chain(DENIED_LEGACY).chain(OWN_PID_ONLY) {
            assert!(words.contains(&((call | bit) as u32)), "{call} has no x32 rule");
            assert!(words.contains(&(call as u32)), "{call} has no rule");
        }
    }
}
