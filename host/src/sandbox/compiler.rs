//! Compiling a component in a child process under caps: a file in `plugins/` is untrusted, and
//! cranelift's memory and time grow with what the file holds. In the host's own process a file
//! built to blow compilation up would take every plugin down with it (the kernel's OOM killer),
//! and again at every start, since the file stays in the folder.
//!
//! The parent ([`compile_in_child`]) runs its own binary as `plugbus compile-child` (hidden;
//! the CLI names it `/proc/self/exe`, so a binary replaced or deleted on disk by an upgrade
//! still compiles for the host that runs), with an empty environment and at most
//! [`MAX_THREADS`] compiling threads (the memory a compile takes grows with them), writes the
//! wasm to its stdin and reads the compiled artifact from its stdout, and kills it once its
//! user CPU time (all its threads') passes `sandbox.compile_timeout` or its peak resident
//! memory passes `sandbox.compile_memory_mib` (both read every 20 ms), or past
//! [`WALL_FACTOR`] times the timeout of wall time (a compile starved by a busy machine: that
//! refusal is not kept). The child ([`child_main`]) first checks
//! that its parent is the host that started it, caps itself (CPU time, no files written, few
//! descriptors, no core dump; a lower priority than the host's events; first in line for the
//! kernel's OOM killer), ends itself if the host goes, builds the host's own engine (the same
//! pool limits, so a file over them is refused in the same words), enters its system-call
//! filter (`compile_jail`: no file, socket or other process from then on), compiles, and
//! exits: 0 with the artifact, [`EXIT_REFUSED`] with wasmtime's message when the file does not compile,
//! [`EXIT_HOST`] when the child itself could not work. How it ended decides what the loader
//! reports: a cap or a compile error is the file's, anything the child could not explain is
//! the host's (`host error: …`).
//!
//! The artifact is trusted as the host's own output: it comes from this binary over a pipe the
//! host opened (the compile cache keeps it under its tag as before).

use super::engine::{SandboxSettings, pooled_engine};
use super::validate::LoadError;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// How the child's stderr starts when it compiles without its system-call filter.
const JAIL_FAILED: &str = "compiling without the system-call filter: ";
/// The hidden subcommand the child runs as.
pub const SUBCOMMAND: &str = "compile-child";
/// The child's exit code when the file does not compile (its message on stderr).
pub const EXIT_REFUSED: u8 = 2;
/// The child's exit code when it could not compile for a reason of its own (its settings, its
/// pipes, its engine): a host failure, never the file's.
pub const EXIT_HOST: u8 = 3;
/// The most threads a child compiles with: the memory a compile takes grows with them (audit's
/// peak: 80 MiB on 2, 110 on 4, 150 on 8, 220 on 16), and a cap should mean the same on a laptop
/// and a 64-core server.
pub const MAX_THREADS: usize = 4;
/// How much of the child's stderr the parent keeps (the message it names).
const MAX_MESSAGE_BYTES: u64 = 16 << 10;
/// How often the parent reads the child's peak memory and CPU time.
const CAPS_CHECK: Duration = Duration::from_millis(20);
/// How many times `sandbox.compile_timeout` (a cap on CPU time) a compile may take in wall
/// time: one starved of CPU by a busy machine is stopped there, and that refusal is not kept.
pub const WALL_FACTOR: u32 = 4;

/// The wall-clock bound of one compile: [`WALL_FACTOR`] times `sandbox.compile_timeout`.
pub fn wall_cap(settings: &SandboxSettings) -> Duration {
    settings.compile_timeout.saturating_mul(WALL_FACTOR)
}
/// How often the child checks that the host that started it is still there.
const PARENT_CHECK: Duration = Duration::from_millis(200);

/// Why a child did not compile a file.
#[derive(Debug)]
pub struct Refused {
    /// What the loader reports.
    pub error: LoadError,
    /// It passed the memory cap (or made more compiled code than it allows) or the CPU-time
    /// cap, or wasmtime refused it (or the compiler's stack overflowed) after at least
    /// [`KEEP_REFUSALS_AFTER`]: the same file under the same caps and sandbox settings, on as many
    /// threads, would again, whatever else the machine does, so the refusal is worth keeping
    /// ([`caps_key`]). The wall-clock bound is not: a machine busy with other work, or with other
    /// files compiling beside it, slows a file that compiles.
    pub repeatable: bool,
}

/// How long a child must have worked on a file wasmtime refuses for the refusal to be kept:
/// wasmtime checks a component against the instance pool (a memory over its slots, too many
/// tables) only once all its code is compiled, so a file that compiles for a minute and is then
/// refused cost that minute at every start and every touch (review 48b M1). A file refused at
/// once (not valid wasm) is cheap to refuse again and keeps no memo.
pub const KEEP_REFUSALS_AFTER: Duration = Duration::from_secs(1);

impl From<LoadError> for Refused {
    fn from(error: LoadError) -> Self {
        Self { error, repeatable: false }
    }
}

/// The compile caps of `settings`, and the sandbox settings wasmtime checks a component
/// against as it makes it (the size of the instance pool's memory slots, the stack), as a key: a
/// refusal kept under one is not under another. Not `max_instances`: a component's share of the
/// pool is the same whatever its size (`engine::CORE_INSTANCES_PER_COMPONENT`), and the tools,
/// which make a pool of 4, share the host's memo.
pub fn caps_key(settings: &SandboxSettings) -> String {
    format!(
        "plugbus {} compile_memory_mib={} compile_timeout={} threads={} max_memory_mib={} max_stack_bytes={}",
        env!("CARGO_PKG_VERSION"),
        settings.compile_memory_mib,
        humantime::format_duration(settings.compile_timeout),
        child_threads(),
        settings.max_memory_mib,
        settings.max_stack_bytes
    )
}

/// How many threads a child compiles with: the machine's cores, at most [`MAX_THREADS`].
fn child_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS)
}

/// Compiles `bytes` in a child process of `program` (the `plugbus` binary) under `settings`'
/// caps and returns the serialized artifact, for `Component::deserialize` on an engine of the
/// same settings.
pub async fn compile_in_child(program: &Path, settings: &SandboxSettings, bytes: &[u8]) -> Result<Vec<u8>, Refused> {
    let host = |what: String| LoadError::Host(format!("compiling in a child process ({}): {what}", program.display()));
    let settings_json = serde_json::to_string(settings).map_err(|e| host(format!("settings: {e}")))?;
    let threads = child_threads();
    let mut command = tokio::process::Command::new(program);
    command
        .arg(SUBCOMMAND)
        .arg("--settings")
        .arg(settings_json)
        .arg("--parent")
        .arg(std::process::id().to_string())
        .env_clear()
        // Nothing of the host's (its secrets, its settings, `PLUGBUS_PERF_MAP`: the host writes
        // the perf map of what it loads; the child may write no file).
        .env("RAYON_NUM_THREADS", threads.to_string());
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| host(format!("cannot start it: {e}")))?;
    let (Some(mut stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(host("its pipes were not opened".into()).into());
    };
    // The artifact is held in memory on both sides: the child's cap bounds it, and the parent
    // reads no more than that.
    let max_artifact = settings.compile_memory_mib.saturating_mul(1 << 20);
    let pid = child.id();
    let started = std::time::Instant::now();
    let work = async {
        let write = async {
            // A child that died early closes its stdin: how it ended says why.
            let _ = stdin.write_all(bytes).await;
            drop(stdin);
        };
        let (_, artifact, message) =
            tokio::join!(write, read_capped(stdout, max_artifact), read_capped(stderr, MAX_MESSAGE_BYTES));
        (artifact, message, child.wait().await)
    };
    let cap_kib = settings.compile_memory_mib.saturating_mul(1024);
    let stopped = tokio::select! {
        ended = work => Ok(ended),
        () = tokio::time::sleep(wall_cap(settings)) => {
            let cpu = cpu_time(pid);
            Err(Refused {
                error: LoadError::Busy(format!(
                    "compiling it took longer than {} of wall time ({WALL_FACTOR} × sandbox.compile_timeout of {}), \
                     having used {} of CPU: the machine was too busy to compile it (not kept: it is compiled \
                     again at the next start or change)",
                    humantime::format_duration(wall_cap(settings)),
                    humantime::format_duration(settings.compile_timeout),
                    cpu.map_or("?".into(), |t| format!("{:.1} s", t.as_secs_f64()))
                )),
                repeatable: false,
            })
        }
        cap = over_caps(pid, cap_kib, settings.compile_timeout) => Err(match cap {
            Cap::Memory(peak_kib) => Refused {
                error: LoadError::Invalid(format!(
                    "compiling it needs more memory than sandbox.compile_memory_mib ({} MiB): the compiler \
                     reached {} MiB",
                    settings.compile_memory_mib,
                    peak_kib / 1024
                )),
                repeatable: true,
            },
            Cap::Cpu => out_of_cpu(settings),
        }),
    };
    let (artifact, message, status) = match stopped {
        Ok(ended) => ended,
        Err(refused) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(refused);
        }
    };
    let status = status.map_err(|e| host(format!("waiting for it: {e}")))?;
    let mut message = String::from_utf8_lossy(&message.unwrap_or_default()).trim().to_string();
    if let Some(said) = message.strip_prefix(JAIL_FAILED) {
        // Its first line, apart from what it says of the file.
        let (why, rest) = said.split_once('\n').unwrap_or((said, ""));
        tracing::warn!(compiler = %program.display(),
            "a plugin file was compiled without the compiler's system-call filter (seccomp): {}",
            crate::event::cut_to(why, 512));
        message = rest.trim().to_string();
    }
    match ending(status, &message) {
        Ending::Compiled => {
            let artifact = artifact.map_err(|e| host(format!("reading its output: {e}")))?;
            if artifact.len() as u64 > max_artifact {
                return Err(Refused {
                    error: LoadError::Invalid(format!(
                        "its compiled code is larger than sandbox.compile_memory_mib ({} MiB)",
                        settings.compile_memory_mib
                    )),
                    repeatable: true,
                });
            }
            Ok(artifact)
        }
        Ending::Refused => {
            // An error of the operating system's (a failed `mmap`: the machine short of memory
            // then) is not the file's, and not kept.
            let repeatable = started.elapsed() >= KEEP_REFUSALS_AFTER && !message.contains("os error");
            Err(Refused { error: LoadError::Invalid(message), repeatable })
        }
        // The kernel's cap, two seconds past the parent's: the parent, which looks every 20 ms,
        // did not see it reached, so a SIGXCPU from elsewhere is not taken for the file's doing
        // (nor kept).
        Ending::OutOfCpu => Err(Refused { repeatable: false, ..out_of_cpu(settings) }),
        Ending::StackOverflow => Err(Refused {
            error: LoadError::Invalid("compiling it overflowed the compiler's stack".into()),
            repeatable: started.elapsed() >= KEEP_REFUSALS_AFTER,
        }),
        Ending::Host => {
            let killed = match status.signal() {
                Some(libc::SIGKILL) => {
                    " (killed from outside: the kernel's OOM killer, if the machine ran out of memory)"
                }
                _ => "",
            };
            Err(host(format!("it ended with {status}{killed}: {}", crate::event::cut_to(&message, 1024))).into())
        }
        // Compiling this file may be what crashed it: not tried again by itself (review 56d M1).
        Ending::Crashed => Err(Refused {
            error: LoadError::Crashed(format!(
                "compiling in a child process ({}): it ended with {status}: {}",
                program.display(),
                crate::event::cut_to(&message, 1024)
            )),
            repeatable: false,
        }),
    }
}

/// How a child ended, as the parent reads it.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Compiled,
    /// Wasmtime refused the file (its message is the reason).
    Refused,
    /// The CPU-time cap's signal.
    OutOfCpu,
    /// Rust names the thread whose stack overflowed before it aborts.
    StackOverflow,
    /// The child could not work for a reason of its own or the machine's: it said so
    /// ([`EXIT_HOST`]), was killed from outside (`SIGKILL`: the OOM killer), or an allocation
    /// failed.
    Host,
    /// Anything else (a panic, a crash, its system-call filter's signal): the host's error, but
    /// compiling this file may be what ended it.
    Crashed,
}

fn ending(status: ExitStatus, message: &str) -> Ending {
    match (status.code(), status.signal()) {
        (Some(0), _) => Ending::Compiled,
        (Some(c), _) if c == i32::from(EXIT_REFUSED) => Ending::Refused,
        (_, Some(libc::SIGABRT)) if message.contains("has overflowed its stack") => Ending::StackOverflow,
        (_, Some(libc::SIGXCPU)) => Ending::OutOfCpu,
        (Some(c), _) if c == i32::from(EXIT_HOST) => Ending::Host,
        (_, Some(libc::SIGKILL)) => Ending::Host,
        (_, Some(libc::SIGABRT)) if message.contains("memory allocation of") => Ending::Host,
        _ => Ending::Crashed,
    }
}

/// The refusal of a file whose compile passed `sandbox.compile_timeout` of CPU time, as the
/// parent saw it: kept, like the memory cap's.
fn out_of_cpu(settings: &SandboxSettings) -> Refused {
    Refused {
        error: LoadError::Invalid(format!(
            "compiling it needs more CPU time than sandbox.compile_timeout ({}) allows",
            humantime::format_duration(settings.compile_timeout)
        )),
        repeatable: true,
    }
}

/// Which cap a child passed.
#[derive(Debug, PartialEq, Eq)]
enum Cap {
    /// Its peak resident set, in KiB, passed the memory cap.
    Memory(u64),
    /// Its user CPU time (every thread's) passed the CPU-time cap.
    Cpu,
}

/// Resolves once the process `pid`'s peak resident set (`VmHWM`, which a peak between two
/// looks still shows) passes `cap_kib`, or its user CPU time passes `cpu_cap`; never while
/// both stay under, or once it is gone.
async fn over_caps(pid: Option<u32>, cap_kib: u64, cpu_cap: Duration) -> Cap {
    let Some(pid) = pid else { return std::future::pending().await };
    let status = format!("/proc/{pid}/status");
    loop {
        tokio::time::sleep(CAPS_CHECK).await;
        let Ok(text) = tokio::fs::read_to_string(&status).await else { return std::future::pending().await };
        if let Some(peak) = peak_kib(&text).filter(|&peak| peak > cap_kib) {
            return Cap::Memory(peak);
        }
        if user_time(pid).is_some_and(|used| used > cpu_cap) {
            return Cap::Cpu;
        }
    }
}

/// The CPU time (user and system) the process `pid` has used, from `/proc/<pid>/stat`: a
/// timeout on a busy machine shows less of it than the wall time.
fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    stat_ticks(pid?, |user, system| user + system)
}

/// The user CPU time of the process `pid`: what the CPU-time cap counts. The compile's own
/// work; system time also holds what the machine makes it pay (page reclaim under memory
/// pressure, which other compiles beside it can cause), which is not the file's doing.
fn user_time(pid: u32) -> Option<Duration> {
    stat_ticks(pid, |user, _| user)
}

/// `which(user, system)` of `/proc/<pid>/stat`'s CPU ticks, as a duration.
fn stat_ticks(pid: u32, which: impl Fn(u64, u64) -> u64) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = which(fields.get(11)?.parse::<u64>().ok()?, fields.get(12)?.parse::<u64>().ok()?);
    // SAFETY: sysconf reads a constant of the system.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|t| *t > 0)?;
    Some(Duration::from_millis(ticks * 1000 / per_second))
}

/// `VmHWM` of a `/proc/<pid>/status`, in KiB (absent for a process that has exited).
fn peak_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line["VmHWM:".len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Reads `from` to its end, keeping at most `cap` + 1 bytes (one past the cap says it was
/// passed) and draining the rest, so the child never blocks on a full pipe.
async fn read_capped(from: impl AsyncRead + Unpin, cap: u64) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut from = from;
    (&mut from).take(cap.saturating_add(1)).read_to_end(&mut kept).await?;
    tokio::io::copy(&mut from, &mut tokio::io::sink()).await?;
    Ok(kept)
}

/// `plugbus compile-child --settings JSON --parent PID`: caps itself, reads a component on
/// stdin, writes its compiled artifact on stdout. Runs before any async runtime or logging is
/// set up.
pub fn child_main(settings_json: &str, parent: u32) -> ExitCode {
    match compile_stdin(settings_json, parent) {
        Ok(Ok(artifact)) => match std::io::stdout().lock().write_all(&artifact) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("writing the compiled code: {e}");
                ExitCode::from(EXIT_HOST)
            }
        },
        Ok(Err(refused)) => {
            eprintln!("{refused:#}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_HOST)
        }
    }
}

/// The child's work: `Err` for its own failures, `Ok(Err)` for a file wasmtime refuses.
fn compile_stdin(settings_json: &str, parent: u32) -> Result<wasmtime::Result<Vec<u8>>, String> {
    // Its host may have gone before this process could watch it: then nobody reads the result.
    if std::os::unix::process::parent_id() != parent {
        return Err(format!("the host (process {parent}) that started it is gone"));
    }
    watch_parent(parent);
    // Nothing the host opened without close-on-exec reaches the compile (stdin, stdout and
    // stderr aside).
    // SAFETY: close_range closes this process's descriptors from 3 up; none is in use yet.
    let _ = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let settings: SandboxSettings =
        serde_json::from_str(settings_json).map_err(|e| format!("reading the settings: {e}"))?;
    cap_self(&settings)?;
    let mut bytes = Vec::new();
    std::io::stdin().lock().read_to_end(&mut bytes).map_err(|e| format!("reading the component: {e}"))?;
    let engine = pooled_engine(&settings).map_err(|e| format!("setting up the engine: {e:#}"))?;
    // From here the file's bytes are worked on: the child reaches nothing beyond its pipes and
    // its own memory (best effort: without seccomp, the caps above stand alone).
    if let Err(why) = super::compile_jail::enter() {
        // Read by the parent, which logs it once the compile is done.
        eprintln!("{JAIL_FAILED}{why}");
    }
    match wasmtime::component::Component::new(&engine, &bytes) {
        Ok(component) => component.serialize().map(Ok).map_err(|e| format!("serializing the compiled code: {e:#}")),
        Err(refused) => Ok(Err(refused)),
    }
}

/// Caps this process: its CPU time two seconds past `sandbox.compile_timeout` (the parent ends it
/// at the cap first; this is for a parent that is gone or slow to look), no file written, few
/// descriptors, no core dump; a lower priority than the host's own threads; and first in line
/// for the kernel's OOM killer, so a machine out of memory loses the compile, not the host.
/// Memory is the parent's to watch: an address-space cap would count the allocator's and the
/// instance pool's reservations, which alone pass many GiB.
fn cap_self(settings: &SandboxSettings) -> Result<(), String> {
    let cpu_secs = settings.compile_timeout.as_secs().saturating_add(2);
    // (soft, hard): past the soft CPU limit the kernel sends SIGXCPU (equal limits would send
    // SIGKILL, which reads as a kill from outside).
    let caps = [
        (libc::RLIMIT_CPU, cpu_secs, cpu_secs + 1, "CPU time"),
        (libc::RLIMIT_FSIZE, 0, 0, "file size"),
        (libc::RLIMIT_NOFILE, 256, 256, "open files"),
        (libc::RLIMIT_CORE, 0, 0, "core dumps"),
    ];
    for (resource, value, hard, what) in caps {
        let limit = libc::rlimit { rlim_cur: value, rlim_max: hard };
        // SAFETY: setrlimit reads the struct we pass and changes only this process's limits.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(format!("capping its {what} at {value}: {}", std::io::Error::last_os_error()));
        }
    }
    // Best effort both: a host that may not lower its children's priority or raise their OOM
    // score still compiles under the caps.
    // SAFETY: setpriority changes only this process's scheduling priority.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    Ok(())
}

/// Ends this process when the host that started it (`parent`) is gone (a `kill -9` of the host
/// leaves no compiler running on its own): its parent changes to whoever adopts it.
fn watch_parent(parent: u32) {
    let _ = std::thread::Builder::new().name("parent-watch".into()).spawn(move || {
        loop {
            std::thread::sleep(PARENT_CHECK);
            if std::os::unix::process::parent_id() != parent {
                std::process::exit(i32::from(EXIT_HOST));
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn signalled(signal: i32) -> ExitStatus {
        ExitStatus::from_raw(signal)
    }

    #[test]
    fn how_a_child_ended_names_the_cap_it_hit_or_the_host() {
        assert_eq!(ending(exited(0), ""), Ending::Compiled);
        assert_eq!(ending(exited(2), "failed to parse"), Ending::Refused);
        assert_eq!(ending(exited(3), "reading the settings"), Ending::Host);
        assert_eq!(
            ending(signalled(libc::SIGABRT), "thread 'main' has overflowed its stack\nfatal runtime error"),
            Ending::StackOverflow
        );
        assert_eq!(ending(signalled(libc::SIGXCPU), ""), Ending::OutOfCpu);
        // An abort the child did not explain (an allocation the machine refused: the memory cap
        // is the parent's to enforce), or a kill from outside, is not the file's doing.
        assert_eq!(ending(signalled(libc::SIGABRT), "memory allocation of 4096 bytes failed"), Ending::Host);
        assert_eq!(ending(signalled(libc::SIGKILL), ""), Ending::Host);
        // Anything else may be the file's doing (review 56d M1): still the host's error, but
        // not tried again by itself.
        assert_eq!(ending(signalled(libc::SIGABRT), "assertion failed"), Ending::Crashed);
        assert_eq!(ending(exited(1), ""), Ending::Crashed);
        assert_eq!(ending(exited(101), "thread 'main' panicked"), Ending::Crashed);
        assert_eq!(ending(signalled(libc::SIGSEGV), ""), Ending::Crashed);
        assert_eq!(ending(signalled(libc::SIGSYS), ""), Ending::Crashed);
    }

    #[test]
    fn the_peak_is_read_from_a_proc_status() {
        let status = "Name:\tplugbus\nVmPeak:\t 1200000 kB\nVmHWM:\t   75432 kB\nVmRSS:\t 70000 kB\n";
        assert_eq!(peak_kib(status), Some(75_432));
        assert_eq!(peak_kib("Name:\tzombie\nState:\tZ (zombie)\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(peak_kib(&own).is_some_and(|kib| kib > 0), "{own}");
    }

    #[tokio::test]
    async fn a_capped_read_keeps_one_byte_past_the_cap_and_drains_the_rest() {
        let data = vec![7u8; 10_000];
        let kept = read_capped(&data[..], 100).await.unwrap();
        assert_eq!(kept.len(), 101);
        let kept = read_capped(&data[..], 20_000).await.unwrap();
        assert_eq!(kept, data);
    }
}
