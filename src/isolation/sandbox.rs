//! The decoder worker's confinement, applied by the worker to itself before it reads a byte
//! of input: an address-space limit, no new privileges, and a seccomp-bpf filter that leaves
//! it nothing but its pipes, memory, threads of its own and its own CPU limit — no files, no
//! sockets, no processes. Anything else fails with ENOSYS, which is also what makes glibc
//! fall back from `clone3` (whose flags a filter cannot see) to `clone`, allowed only for
//! threads: the JPEG decoder decodes colour components on threads of its own.

use std::collections::BTreeMap;

use rustix::process::{setrlimit, Resource, Rlimit};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// The system calls a de-identification needs once its input is in memory.
// Syscall numbers are `c_long`, which is i64 on every 64-bit Linux octd runs on.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    // abort() and a stack overflow's report end the process through these.
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Threads (see `clone` below): what a new thread sets up, and the CPU count query.
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
];

/// Limit the address space to `memory_bytes` (hard and soft, so it cannot be raised again)
/// and install the filter. Returns a description for the daemon's log.
pub fn confine(memory_bytes: u64) -> Result<String, String> {
    setrlimit(Resource::As, Rlimit { current: Some(memory_bytes), maximum: Some(memory_bytes) })
        .map_err(|e| format!("address-space limit: {e}"))?;
    // A core dump of a decoder holds the scan: none.
    setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: Some(0) }).map_err(|e| format!("core limit: {e}"))?;
    rustix::thread::set_no_new_privs(true).map_err(|e| format!("no_new_privs: {e}"))?;
    let Ok(arch) = TargetArch::try_from(std::env::consts::ARCH) else {
        return Ok(format!("rlimits, no_new_privs (no seccomp filter for {})", std::env::consts::ARCH));
    };
    let filter = filter(arch)?;
    seccompiler::apply_filter(&filter).map_err(|e| format!("seccomp: {e}"))?;
    Ok("rlimits, no_new_privs, seccomp".into())
}

fn filter(arch: TargetArch) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|&n| (n, vec![])).collect();
    // prlimit64(0, RLIMIT_CPU, ...) only: the worker sets its own CPU budget per scan, and
    // can touch no other limit of its own or any limit of another process.
    let own_cpu_limit = SeccompRule::new(vec![
        SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0).map_err(|e| e.to_string())?,
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::RLIMIT_CPU as u64)
            .map_err(|e| e.to_string())?,
    ])
    .map_err(|e| e.to_string())?;
    rules.insert(libc::SYS_prlimit64, vec![own_cpu_limit]);
    // clone(CLONE_THREAD | ...) only: threads, never a new process.
    let thread = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .map_err(|e| e.to_string())?])
    .map_err(|e| e.to_string())?;
    rules.insert(libc::SYS_clone, vec![thread]);
    let filter = SeccompFilter::new(rules, SeccompAction::Errno(libc::ENOSYS as u32), SeccompAction::Allow, arch)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| format!("seccomp program: {e}"))
}

/// The hard CPU limit the service manager set (`LimitCPU=`), read before confinement.
pub fn cpu_hard_limit() -> Option<u64> {
    rustix::process::getrlimit(Resource::Cpu).maximum
}

/// Let the next scan use `seconds` of CPU from now on; past that the kernel sends SIGXCPU.
/// Stays within `hard` (from [`cpu_hard_limit`]).
pub fn cpu_budget(seconds: u64, hard: Option<u64>) -> Result<(), String> {
    let used = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let used = u64::try_from(used.tv_sec).unwrap_or(0);
    let soft = (used + seconds.max(1)).min(hard.unwrap_or(u64::MAX));
    setrlimit(Resource::Cpu, Rlimit { current: Some(soft), maximum: hard }).map_err(|e| format!("CPU limit: {e}"))
}
